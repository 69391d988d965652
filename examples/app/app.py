"""A sample application for bluegreen: a Flask app with a health route.

bluegreen serves it with gunicorn as ``app:app``; each release says which commit it runs.
"""

import os
import time

from flask import Flask, Response, jsonify, render_template_string, request

app = Flask(__name__)

with open(os.path.join(os.path.dirname(__file__), "VERSION")) as version_file:
    VERSION = version_file.read().strip()
RELEASE = os.environ.get("BLUEGREEN_RELEASE", "unknown")


@app.get("/")
def index():
    return jsonify(version=VERSION, release=RELEASE, pid=os.getpid(),
                   instance=os.environ.get("BLUEGREEN_PORT", ""))


@app.get("/health")
def health():
    return jsonify(status="ok", version=VERSION)


@app.get("/request")
def request_seen():
    """What the app believes about the request: its scheme and the client's address (the
    peer's, and the one a forwarder reports in X-Forwarded-For)."""
    return jsonify(scheme=request.scheme, remote_addr=request.remote_addr,
                   forwarded_for=request.headers.getlist("X-Forwarded-For"))


PAGE = """<!doctype html><title>Release {{ version }}</title><table>
{% for row in rows %}<tr><td>{{ row.n }}</td><td>{{ row.name | title }}</td>
<td>{{ "%.3f" | format(row.value) }}</td></tr>
{% endfor %}</table>"""


@app.get("/page")
def page():
    """A page that does some real work: a template of ?rows= (default 100) rows, a few ms of CPU."""
    count = min(int(request.args.get("rows", "100")), 10000)
    rows = [{"n": n, "name": f"item number {n}", "value": n / 7} for n in range(count)]
    return render_template_string(PAGE, version=VERSION, rows=rows)


@app.get("/slow")
def slow():
    """Answers after ?seconds= (default 3): a request still in flight during a switch."""
    seconds = min(float(request.args.get("seconds", "3")), 30.0)
    time.sleep(seconds)
    return jsonify(version=VERSION, slept=seconds)


@app.post("/echo")
def echo():
    """Answers with the request's body; X-Version says which release answered."""
    return request.get_data(), 200, {"Content-Type": "application/octet-stream", "X-Version": VERSION}


@app.get("/stream")
def stream():
    """A long-lived response: the version, once every 0.1 s for ?seconds= (default 10), then "end"."""
    seconds = min(float(request.args.get("seconds", "10")), 600.0)

    def lines():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            yield f"{VERSION}\n"
            time.sleep(0.1)
        yield "end\n"

    return Response(lines(), mimetype="text/plain")
