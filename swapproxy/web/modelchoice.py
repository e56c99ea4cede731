# -*- test-case-name: tests.test_web -*-
"""
Which model a request is for when it names none.

llama-server serves one model and needs no ``model`` in a request; llama.cpp's router takes it from
the body or from ``?model=``. A request that names no model goes, in this order, to:

1. the configured ``defaultModel``;
2. the only model configured;
3. the only model that is running (starting or ready);

and otherwise gets a 400 that says how to name one.
"""

from __future__ import annotations

from swapproxy.config import ModelConfig
from swapproxy.supervisor import Supervisor
from swapproxy.upstream import State

#: Why a request that names no model cannot be served.
NO_MODEL = (
    "missing or invalid 'model' field: it must name a model (see GET /v1/models); with several "
    "models configured, set defaultModel in the config to serve requests that name none"
)


def default_model(supervisor: Supervisor, running: bool = True) -> ModelConfig | None:
    """
    The model a request that names none is for, or ``None`` when there is no single answer.

    :param running: whether the only model running counts (rule 3); not for an answer that
        should not change as models come and go.
    """
    config = supervisor.config
    if config.default_model:
        return config.models.get(config.default_model)
    if len(config.models) == 1:
        return next(iter(config.models.values()))
    if not running:
        return None
    running_models = [
        upstream.model
        for upstream in supervisor.upstreams.values()
        if upstream.state in (State.STARTING, State.READY)
    ]
    return running_models[0] if len(running_models) == 1 else None
