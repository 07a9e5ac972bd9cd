"""What the stages share and are built from: checkpoint formats, state-dict cleaning, building the
model, input specs and tensors, state as I/O, streaming, export error messages, the fidelity
judgement, layer diagnosis, timing and artifact test cases. No stage lives here."""
