"""``scaler simulate``: the real decision core in a closed loop against a modelled backend.

Compare policies offline on a recorded or synthetic trace before trusting one with the stack::

    from scaler.policy import load_policy
    from scaler.simulate import load_trace, simulate, summarise

    result = simulate(load_policy("compose/scaler-policy.yaml"), load_trace("burst.yaml"), seed=1)
    summarise(result)["services"]["worker-io"]["drain_s"]

Modules: ``trace`` (the load), ``model`` (workers, tasks, host, with sourced defaults),
``distributions``, ``engine`` (the discrete-event loop around ``scaler.decide.decide``),
``cluster`` (the modelled backend, with the backends' removal order and warm-pool plan),
``wakeups`` (the loop's arming rule and ``Debouncer`` in simulated time), ``records`` (what a
run produced), ``report`` (figures and files), ``cli`` (the subcommand).
"""

from scaler.simulate.engine import SimResult, simulate
from scaler.simulate.model import Model, ModelError, build_model, load_model_spec
from scaler.simulate.report import summarise
from scaler.simulate.trace import Trace, TraceError, load_trace

__all__ = [
    "Model",
    "ModelError",
    "SimResult",
    "Trace",
    "TraceError",
    "build_model",
    "load_model_spec",
    "load_trace",
    "simulate",
    "summarise",
]
