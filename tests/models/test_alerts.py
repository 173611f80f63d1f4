"""Alert sinks: each flag is POSTed to the webhook and NOTIFYed on the configured channel; a receiver that hangs
delays nothing."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from tests.models.conftest import wait_for
from tests.ops.helpers import admin_rows, metric_samples

INJECTION = "SELECT 1 WHERE 1 = 1 OR 'a' = 'a'"


@pytest.fixture
def webhook():
    """An HTTP server collecting the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/anomaly", received
    server.shutdown()


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    sock.close()


def test_a_flag_is_posted_to_the_webhook_and_notified_on_the_channel(pg, fresh_db, proxy_factory, tmp_path, webhook):
    url, received = webhook
    proxy = proxy_factory(fresh_db, learning={"model_dir": str(tmp_path)},
                          anomaly={"webhook_url": url, "notify_channel": "pgpilot_anomalies"})
    with psycopg.connect(pg.dsn_for(fresh_db), autocommit=True) as listener:
        listener.execute("LISTEN pgpilot_anomalies")
        with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as conn:
            conn.execute(INJECTION)
        notified = next(listener.notifies(timeout=10, stop_after=1), None)
    assert notified is not None, proxy.log()
    note = json.loads(notified.payload)
    hook = wait_for(lambda: received, what="the webhook POST")[0]
    for doc in (note, hook):
        assert doc["class"] == "injection" and doc["score"] >= 1.0
        assert doc["database"] == fresh_db and doc["fingerprint"] and "tautology" in doc["reason"]
    # A sink counts a send once its call returned, which can be after the listener or the server saw it.
    sent = (("pgpilot_anomaly_alerts_total", (("result", "sent"), ("sink", "webhook"))),
            ("pgpilot_anomaly_alerts_total", (("result", "sent"), ("sink", "notify"))))
    wait_for(lambda: all(metric_samples(proxy).get(k) == 1 for k in sent), what="both sends counted")


def test_a_webhook_that_never_answers_delays_no_flag(pg, fresh_db, proxy_factory, tmp_path, silent_server):
    proxy = proxy_factory(fresh_db, learning={"model_dir": str(tmp_path)},
                          anomaly={"webhook_url": silent_server, "webhook_timeout": 0.5, "webhook_queue": 2})
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as conn:
        for i in range(6):
            conn.execute(f"SELECT {i} WHERE {i} = {i} OR 'a' = 'a'")
        flags = wait_for(lambda: len(admin_rows(proxy, "SHOW ANOMALIES")) == 6 and admin_rows(proxy, "SHOW ANOMALIES"),
                         what="six flags")
    assert all(f["class"] == "injection" for f in flags)
    samples = metric_samples(proxy)
    assert samples[("pgpilot_anomaly_alerts_total", (("result", "dropped"), ("sink", "webhook")))] >= 3
    wait_for(lambda: metric_samples(proxy)[("pgpilot_anomaly_alerts_total", (("result", "failed"), ("sink", "webhook")))]
             >= 1, what="the webhook timing out")
