"""A sample application for bluegreen: a Flask app with a health route.

bluegreen serves it with gunicorn as ``app:app``; each release says which commit it runs.
"""

import os
import time

from flask import Flask, jsonify, request

app = Flask(__name__)

with open(os.path.join(os.path.dirname(__file__), "VERSION")) as version_file:
    VERSION = version_file.read().strip()
RELEASE = os.environ.get("BLUEGREEN_RELEASE", "unknown")


@app.get("/")
def index():
    return jsonify(version=VERSION, release=RELEASE, pid=os.getpid())


@app.get("/health")
def health():
    return jsonify(status="ok", version=VERSION)


@app.get("/slow")
def slow():
    """Answers after ?seconds= (default 3): a request still in flight during a switch."""
    seconds = min(float(request.args.get("seconds", "3")), 30.0)
    time.sleep(seconds)
    return jsonify(version=VERSION, slept=seconds)
