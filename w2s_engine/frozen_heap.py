"""freeze_loaded_objects: what an engine loaded is left out of Python's full collections.

The models, tokenizers and the torch, transformers and triton modules they pull in are some
400k objects that live as long as the engine. A full (oldest-generation) collection walks
them all, about 0.2 s on a 2-core CPU, and one comes every few seconds of searching: every
search in flight stalls meanwhile, and on a GPU the device idles. gc.freeze() moves what
exists now to a permanent generation that collections skip (vLLM's engine and servers that
fork do the same), so they walk only what the searches create. The price is that objects
alive at the freeze that die later in a reference cycle are never reclaimed (a test suite
that builds an engine per test grew by a third): `w2s serve`, one engine for the process's
life, freezes; a program embedding the engine chooses (EngineConfig(freeze_gc=True)).
"""

import atexit
import gc

_unfreeze_at_exit = False


def freeze_loaded_objects():
    global _unfreeze_at_exit
    gc.collect()     # garbage of the loading itself is freed, not frozen
    gc.freeze()
    if not _unfreeze_at_exit:
        # Frozen objects are never freed at exit, and triton's bindings (nanobind) print
        # dozens of "leaked function" lines on stderr as the interpreter ends.
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True
