"""pipeline/quiet.py's log filters drop exactly the records they name."""

from __future__ import annotations

import logging
import sys

from pipeline.quiet import _VLLM_ASYNC_LLM_LOGGER, _DropEngineDeadTraceback


class EngineDeadError(Exception):  # vLLM's class is matched by name: vLLM need not be importable here
    pass


def _record(exc: BaseException | None) -> logging.LogRecord:
    try:
        if exc is not None:
            raise exc
    except BaseException:
        info = sys.exc_info()
    else:
        info = None
    return logging.LogRecord(_VLLM_ASYNC_LLM_LOGGER, logging.ERROR, "async_llm.py", 906,
                             "AsyncLLM output_handler failed.", None, info)  # fmt: skip


def test_the_engine_dead_traceback_of_a_shut_down_engine_is_dropped_and_nothing_else():
    drop = _DropEngineDeadTraceback()
    assert drop.filter(_record(EngineDeadError("EngineCore encountered an issue"))) is False
    assert drop.filter(_record(RuntimeError("a real bug"))) is True
    assert drop.filter(_record(None)) is True


def test_the_filter_is_on_the_logger_vllm_logs_it_with():
    import vllm.v1.engine.async_llm as module

    assert module.logger.name == _VLLM_ASYNC_LLM_LOGGER
