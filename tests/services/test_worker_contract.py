"""The worker side of the scaler's contract uses the scaler's names (scaler.worker_contract).

``services.warm_start`` and ``services.ownership`` are copied alone into test images, so they
keep their own literal instead of importing the scaler's; this is where a rename on one side
without the other fails, instead of a warm pool that never boots warm or a restore that finds
no owners."""

from __future__ import annotations

from scaler import worker_contract
from services import ownership, resource_report, warm_start


def test_the_worker_side_names_are_the_scalers() -> None:
    assert warm_start.WARM_ENV == worker_contract.WARM_START_ENV
    assert resource_report.COMMAND == worker_contract.RESOURCE_COMMAND
    assert ownership.OWNER_KEY == worker_contract.OWNER_KEY
