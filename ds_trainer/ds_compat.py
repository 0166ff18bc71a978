"""A one-line fix to DeepSpeed's universal-checkpoint loading, applied at engine build time.

DeepSpeed 0.19.8, `ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir`, reads
`steps[0]` for every parameter group, where `steps` has one entry per parameter of the group
inside this rank's ZeRO partition. A group smaller than world size x alignment (the head's
bias: 2 numbers) leaves some ranks' partitions holding only padding, `steps` is empty, and
loading a universal checkpoint onto 2+ ranks dies with `IndexError: list index out of range`
(`tests/test_elastic.py` resuming 1 -> 2 ranks shows it). Such a partition holds no parameter,
so there is no optimizer step count to restore: skipping it is the fix.

The patch rewrites exactly that condition in DeepSpeed's own source and refuses to do
anything if the source differs, so an upgraded DeepSpeed is used as it is.
"""

from __future__ import annotations

import inspect
import logging
import textwrap

log = logging.getLogger(__name__)

_BUGGY = "if steps[0] is not None:"
_FIXED = "if steps and steps[0] is not None:"
_applied = False


def patch_universal_loading() -> bool:
    """Apply the fix once; True when DeepSpeed's method now tolerates empty partitions."""
    global _applied
    if _applied:
        return True
    from deepspeed.runtime import base_optimizer

    cls = base_optimizer.ZeROOptimizer  # the base of the ZeRO 1/2 and bf16 optimizers
    method = cls.load_hp_checkpoint_state_from_checkpoint_dir
    try:
        source = textwrap.dedent(inspect.getsource(method))
    except (OSError, TypeError):
        return False
    if source.count(_BUGGY) != 1:
        log.debug("DeepSpeed's universal loading differs from 0.19.8's; not patched")
        return False
    namespace: dict = {}
    exec(  # noqa: S102 - DeepSpeed's own method, recompiled with the one-line fix (see the module docstring)
        compile(source.replace(_BUGGY, _FIXED), inspect.getsourcefile(method) or "<deepspeed>", "exec"),
        vars(base_optimizer),
        namespace,
    )
    cls.load_hp_checkpoint_state_from_checkpoint_dir = namespace[method.__name__]
    _applied = True
    return True
