"""How our Celery workers log (the GPU worker's worker/app.py, the webhook worker's worker/webhooks.py): every
record through core/logs.py, nothing printed beside it.

Celery's start-up banner is plain text: with JSON logs it is not printed (the worker's `quiet`, as `celery
--quiet` sets it). torch, diffusers and transformers give their loggers handlers of their own, which print
plain lines, and show tqdm progress bars: the GPU worker imports them once its logging is set up, takes their
handlers off (their records reach ours) and turns the bars off. Celery's own lines per task ("Received task",
"Task … succeeded") are left to DEBUG by core/logs.py: a task that ran to its end says nothing of its
prediction, which may have failed; the worker's line per prediction (worker/runtime.py) and per webhook
attempt (worker/webhooks.py) say what happened. Left as Celery prints it: its notice on a signal to stop
(`worker: Warm shutdown (MainProcess)`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_init, setup_logging

from core import logs
from core.settings import Settings


def install(settings: Settings, model_libraries: bool = False) -> None:
    """Connect the signals: the logging setup (Celery then leaves it to us; with `model_libraries`, those
    imported and routed to ours right after), done once more at Celery's own setup, and the banner."""

    def configure(**_: Any) -> None:
        logs.configure(settings.log_format, settings.log_level, settings.secret_values())
        if model_libraries:
            _model_libraries_through_ours()

    def early(instance: Any = None, **_: Any) -> None:
        """At the worker's init, before Celery's own warnings (e.g. on running as root) and banner."""
        if instance is not None and settings.log_format == "json":
            instance.quiet = True
        configure()

    setup_logging.connect(configure, weak=False)
    celeryd_init.connect(early, weak=False)


def _model_libraries_through_ours() -> None:
    """Import torch, then diffusers' and transformers' logging, each before the next can log through its own
    handler; no progress bars."""
    import torch  # noqa: F401 - its import installs the handlers taken off here

    _own_handlers_off()
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from huggingface_hub.utils import disable_progress_bars

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
    disable_progress_bars()
    _own_handlers_off()


def _own_handlers_off() -> None:
    """Every plain stream handler a library put on its loggers (ours is the root's) goes; their records
    propagate to the root's."""
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
                logger.propagate = True
