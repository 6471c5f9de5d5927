"""Suite-wide hygiene.

In-process tests may start a world of one (the platform layer then sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, as torchrun would) or set the variables a deterministic run
needs. A later test that starts `nemotron-train` or torchrun in a subprocess inherits the
environment: it would take the world of one for its own launch, or try to listen on a port the
test process still holds. Each test therefore gets the environment it started with back.
"""

from __future__ import annotations

import os

import pytest


def _restoring():
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


# Module scope covers module-scoped fixtures (autouse fixtures start first within a scope);
# function scope covers the tests themselves.
_restore_module_environment = pytest.fixture(autouse=True, scope="module", name="_restore_module_environment")(_restoring)
_restore_test_environment = pytest.fixture(autouse=True, name="_restore_test_environment")(_restoring)


@pytest.fixture(scope="module")
def mcore():
    """A world of one with megatron-core's parallel state (TP = PP = 1), for in-process layer
    tests; torn down after the module only if the module created it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemotron_train.platform import init_distributed, setup_platform

    created_world = not dist.is_initialized()
    init_distributed(setup_platform())
    created_mp = not parallel_state.model_parallel_is_initialized()
    if created_mp:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if created_mp:
        parallel_state.destroy_model_parallel()
    if created_world:
        dist.destroy_process_group()
