"""Where an artifact runs besides the host's own runtime: the devices a target ships to.

    devices.py        each device of conf/target/<name>.yaml placed on this host: native,
                      emulated (qemu-user), browser, or skipped with its reason; its session
    emulated.py       a session in a device's own Python under qemu-user (devices/install.py)
    device_worker.py  what runs inside it: the format's runtime, nothing of the project
    browser.py        onnxruntime-web's wasm in headless Chromium (web/install.sh)

A session is a context manager with run(feed) -> outputs, run_many(feeds) -> [[outputs]] and
describe() -> str (runtime, version, where); the browser's also latency(feed, warmup, runs).
"""
