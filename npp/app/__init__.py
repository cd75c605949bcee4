"""The application: the command line, the wiring of training with evaluation, the demo, the launcher.

The only package that imports more than one stage. Below it, `npp.tokenize`, `npp.train`
and `npp.eval` import only `npp.models`, `npp.pipeline` and `npp.errors` (docs/architecture.md).
"""
