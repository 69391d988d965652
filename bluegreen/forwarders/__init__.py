"""The forwarders: what carries the public port to the serving instances.

``control`` starts, switches and drains them from the controller, whose parts move an app's
forwarders through its one ``control.Forwarders``; ``haproxy`` configures
``bluegreen-haproxy.service``, from the controller too. Three modules run in other processes:
``hook`` in the forwarder units (``ExecStartPost=``, ``ExecStop=``), ``reuseport`` (the public
port's ``SO_REUSEPORT`` group and its steering program) inside ``hook``, and ``proxy`` as
``bluegreen-proxy@PORT.service``. Each module's own docstring says where it runs.
"""
