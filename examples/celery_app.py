"""Celery tasks that create jobs through one fleet-mode SyncCapacityGate.

Celery's prefork pool imports this module in the parent process, then forks the workers.
The gate made here, at import time, starts nothing until a task uses it; each worker
process then runs its own event loop thread for it. With ``store=RedisStore(...)`` every
worker process (and every other host with the same token, service and namespace) joins one
fleet: no account is ever oversubscribed across processes, and the fleet polls
``scheduler/available`` about once per ``poll_interval`` in all, however many workers.

Try it against the simulator (needs the ``celery`` extra and a Redis on 127.0.0.1:6379)::

    capgate serve-fake --service kling --accounts a@x.io=3,b@x.io=2   # prints its URL
    export USEAPI_TOKEN=fake-token
    export CAPGATE_URL=http://127.0.0.1:PORT/v1/kling/scheduler/available
    cd examples && celery -A celery_app worker --pool=prefork --concurrency=4
    # elsewhere, with the same environment:
    cd examples && python -c "from celery_app import create_job as c; print(c.delay('cat').get())"

Settings, from the environment:

- ``USEAPI_TOKEN``: the token (the simulator's is ``fake-token``).
- ``CAPGATE_URL``: the ``scheduler/available`` URL; the service's real one when unset.
- ``CAPGATE_CREATE_URL``: where to POST a job. By default the service's create endpoint
  beside ``CAPGATE_URL`` (``…/v1/kling/videos/text2video``), which the simulator serves too;
  for real use, check its body against the service's documentation.
- ``CAPGATE_SERVICE`` (``kling``), ``CAPGATE_POLL_INTERVAL`` (5 s).
- ``CAPGATE_REDIS_URL``: the fleet's Redis; ``CAPGATE_NAMESPACE``: its key namespace.
- ``CELERY_BROKER_URL``: the broker (and result backend); its keys get the prefix
  ``<namespace>-celery:``, so one Redis can serve both without the two mixing.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from celery import Celery
from celery.signals import worker_process_shutdown

from capgate import SERVICES, SyncCapacityGate
from capgate.redis import RedisStore

SERVICE = os.environ.get("CAPGATE_SERVICE", "kling")
NAMESPACE = os.environ.get("CAPGATE_NAMESPACE", "capgate")
BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("capgate_example", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_transport_options={"global_keyprefix": f"{NAMESPACE}-celery:"},
    result_backend_transport_options={"global_keyprefix": f"{NAMESPACE}-celery:"},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,  # a waiting task holds one worker, not a batch of tasks
    worker_hijack_root_logger=False,
)

# made once per worker at import time, in the parent: each forked child gets its own loop
# thread on first use, and they all share one fleet through Redis
gate = SyncCapacityGate(
    service=SERVICE,
    url=os.environ.get("CAPGATE_URL"),
    poll_interval=float(os.environ.get("CAPGATE_POLL_INTERVAL", "5")),
    store=RedisStore(
        os.environ.get("CAPGATE_REDIS_URL", "redis://127.0.0.1:6379/0"), namespace=NAMESPACE
    ),
)
CREATE_URL = (
    os.environ.get("CAPGATE_CREATE_URL")
    or gate.url.rsplit("/scheduler/available", 1)[0] + "/" + SERVICES[SERVICE].create_path
)
ACCOUNT_KEY = SERVICES[SERVICE].account_key


@worker_process_shutdown.connect
def close_gate(**_: Any) -> None:
    """A worker process leaving gives its slots back and leaves the fleet's queue now."""
    gate.close()


@app.task(name="capgate_example.create_job")
def create_job(prompt: str, ref: str | None = None) -> dict[str, Any]:
    """Create one job on whichever account has a free slot; retries 429s on other accounts."""
    headers = {"Authorization": f"Bearer {os.environ['USEAPI_TOKEN']}"}

    def create(account: str) -> requests.Response:
        body = {ACCOUNT_KEY: account, "prompt": prompt, "replyRef": ref}
        return requests.post(CREATE_URL, json=body, headers=headers, timeout=60)

    response = gate.submit(create, timeout=600)
    response.raise_for_status()
    return {"status": response.status_code, "job": response.json(), "pid": os.getpid()}
