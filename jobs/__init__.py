"""The jobs users run (convert, reshard, inspect, verify, push, generate, train, finetune, data
prepare, plan, init, demo): each module takes a typed request and returns a typed result, combining
the core engine (`mzoo`), the models, the Hugging Face converters and the zoo. `mzoo.cli` only parses
flags, calls one job and prints; docs/architecture.md has the import rules."""
