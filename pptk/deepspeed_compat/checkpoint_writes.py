# The files DeepSpeed's save_checkpoint writes, routed through a function of pptk's: recorded, and a failure survived.
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Write = Callable[[Path, Callable[[], object]], None]


@contextmanager
def checkpoint_writes_through(engine, write: Write) -> Iterator[None]:
    """Inside this context every file ``engine.save_checkpoint`` writes goes through ``write(path, do_write)``.

    Written against DeepSpeed 0.19.8: ``save_checkpoint`` writes the engine file (``mp_rank_XX_model_states.pt``),
    each layer file (``PipelineModule.save_state_dict``) and the ZeRO shard with
    ``engine.checkpoint_engine.save(state_dict, path)``, and rank 0 copies ``zero_to_fp32.py`` and
    ``zero_to_torch.py`` beside the tags with ``engine._copy_recovery_script(save_dir)``. A failed write raises
    from inside save_checkpoint, between its collectives (a barrier ends it): the other ranks would wait there for
    the one that raised. Through ``write``, pptk records each file and absorbs a failure, so every rank runs the
    same collectives and the failure is reported after them.
    """
    checkpoint_engine = engine.checkpoint_engine
    save, copy_scripts = checkpoint_engine.save, engine._copy_recovery_script

    def routed_save(state_dict, path) -> None:
        write(Path(path), lambda: save(state_dict, path))

    def routed_copy(save_path) -> None:
        write(Path(save_path) / "zero_to_fp32.py", lambda: copy_scripts(save_path))

    checkpoint_engine.save = routed_save
    engine._copy_recovery_script = routed_copy
    try:
        yield
    finally:
        del checkpoint_engine.save  # the instance attributes go; the class's methods show again
        del engine._copy_recovery_script
