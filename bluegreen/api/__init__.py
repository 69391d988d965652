"""bluegreen's API: the D-Bus service the daemon exports (dbus.py), the HTTP API that is a
thin client of it (http.py, run by bluegreen-api.service), and the names both sides share
(names.py)."""
