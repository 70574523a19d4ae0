"""capgate: gate job submissions to capacity-limited useapi.net accounts.

Wait for a free slot, reserve it, hand out the account; never oversubscribe::

    gate = CapacityGate(token, service="kling")
    async with gate as email:
        await submit_job(email, prompt)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _dist_version

from ._errors import AccountQuarantined as AccountQuarantined
from ._errors import AuthenticationError as AuthenticationError
from ._errors import CapacityGateError as CapacityGateError
from ._errors import GateClosed as GateClosed
from ._errors import PollError as PollError
from ._errors import SlotTimeout as SlotTimeout
from ._errors import SubmissionFailed as SubmissionFailed
from ._gate import CapacityGate as CapacityGate
from ._gate import Slot as Slot
from ._models import AccountCapacity as AccountCapacity
from ._models import AccountStatistics as AccountStatistics
from ._models import ExecutingJob as ExecutingJob
from ._models import GateStatistics as GateStatistics
from ._models import Snapshot as Snapshot
from ._services import SERVICES as SERVICES
from ._services import Service as Service
from ._services import ServiceInfo as ServiceInfo
from ._services import services as services
from ._strategy import Candidate as Candidate
from ._sync import SyncCapacityGate as SyncCapacityGate
from ._sync import SyncSlot as SyncSlot

try:
    __version__ = _dist_version("capgate")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    from ._version import __version__

__all__ = [
    "SERVICES",
    "AccountCapacity",
    "AccountQuarantined",
    "AccountStatistics",
    "AuthenticationError",
    "Candidate",
    "CapacityGate",
    "CapacityGateError",
    "ExecutingJob",
    "GateClosed",
    "GateStatistics",
    "PollError",
    "Service",
    "ServiceInfo",
    "Slot",
    "SlotTimeout",
    "Snapshot",
    "SubmissionFailed",
    "SyncCapacityGate",
    "SyncSlot",
    "__version__",
    "services",
]
