// onnxruntime-web (wasm backend) runner, driven over CDP by stages/runtimes/browser.py.
// Tensors cross as one binary "pack": u32 LE header length, JSON header, padding to 8, payload.
// Header: {items: [[{name, dtype, shape, offset, nbytes} | {name, dtype: "string", shape, strings}]]}
// (one list of tensors per feed / per run's outputs; offsets are into the payload, 8-aligned).
import * as ort from "/ort/ort.wasm.min.mjs";

const ARRAYS = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array, int64: BigInt64Array,
  uint64: BigUint64Array, int32: Int32Array, uint32: Uint32Array, int16: Int16Array,
  uint16: Uint16Array, int8: Int8Array, uint8: Uint8Array, bool: Uint8Array,
};
// the smallest module using a v128 op: SIMD support, as onnxruntime-web itself checks it
const SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 4, 1, 96, 0, 0, 3, 2, 1, 0, 10, 30, 1,
  28, 0, 65, 0, 253, 15, 253, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 253, 186, 1, 26, 11]);
let session = null;

/** Decode a pack into a list of feeds ({name: ort.Tensor}). */
function unpack(buffer) {
  const size = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, size)));
  const base = Math.ceil((4 + size) / 8) * 8;
  return header.items.map((tensors) => Object.fromEntries(tensors.map((t) => {
    if (t.dtype === "string") return [t.name, new ort.Tensor("string", t.strings, t.shape)];
    const Array_ = ARRAYS[t.dtype];
    const data = new Array_(buffer, base + t.offset, t.nbytes / Array_.BYTES_PER_ELEMENT);
    return [t.name, new ort.Tensor(t.dtype, data, t.shape)];
  })));
}

/** Encode a list of results ([[name, ort.Tensor]]) as a pack. */
function pack(items) {
  const parts = [];
  let offset = 0;
  const header = {items: items.map((tensors) => tensors.map(([name, t]) => {
    if (t.type === "string") return {name, dtype: "string", shape: t.dims, strings: t.data};
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    const entry = {name, dtype: t.type, shape: t.dims, offset, nbytes: bytes.byteLength};
    parts.push([offset, bytes]);
    offset += Math.ceil(bytes.byteLength / 8) * 8;
    return entry;
  }))};
  const text = new TextEncoder().encode(JSON.stringify(header));
  const base = Math.ceil((4 + text.length) / 8) * 8;
  const out = new Uint8Array(base + offset);
  new DataView(out.buffer).setUint32(0, text.length, true);
  out.set(text, 4);
  for (const [at, bytes] of parts) out.set(bytes, base + at);
  return out.buffer;
}

/** Create the session: wasm EP, a fixed thread count (set once per page, before the first session). */
async function load(modelUrl, options = {}) {
  if (session) throw new Error("load() once per page: the wasm thread count is fixed by the first session");
  const threads = options.threads ?? 1;
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmPaths = "/ort/";
  const start = performance.now();
  session = await ort.InferenceSession.create(modelUrl, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: options.graphOptimizationLevel ?? "all",
    externalData: (options.externalData ?? []).map((f) => ({path: f.path, data: f.url})),
  });
  return {
    ortVersion: ort.env.versions.web, backend: "wasm", threads: ort.env.wasm.numThreads,
    requestedThreads: threads, crossOriginIsolated: self.crossOriginIsolated,
    simd: WebAssembly.validate(SIMD_PROBE), userAgent: navigator.userAgent,
    inputNames: session.inputNames, outputNames: session.outputNames,
    loadMs: performance.now() - start,
  };
}

/** Run every feed of a pack in turn; the outputs (graph order) of each as one pack. */
async function run(feedsBinary) {
  const items = [];
  for (const feeds of unpack(feedsBinary)) {
    const results = await session.run(feeds);
    items.push(session.outputNames.map((name) => [name, results[name]]));
  }
  return pack(items);
}

/** run() with the pack fetched from inUrl and the result POSTed to outUrl (raw bytes both ways). */
async function runUrl(inUrl, outUrl) {
  const input = await (await fetch(inUrl)).arrayBuffer();
  const start = performance.now();
  const output = await run(input);
  const ms = performance.now() - start;
  const response = await fetch(outUrl, {method: "POST", body: output});
  if (!response.ok) throw new Error(`POST ${outUrl}: ${response.status}`);
  return {ms, bytes: output.byteLength};
}

/** Per-run milliseconds (performance.now) of the pack's first feed, after `warmup` untimed runs. */
async function time(feedsUrl, warmup, runs) {
  const [feeds] = unpack(await (await fetch(feedsUrl)).arrayBuffer());
  for (let i = 0; i < warmup; i++) await session.run(feeds);
  const times = [];
  for (let i = 0; i < runs; i++) {
    const start = performance.now();
    await session.run(feeds);
    times.push(performance.now() - start);
  }
  return times;
}

window.runner = {load, run, runUrl, time, ort};
