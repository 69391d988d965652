"""The forwarders: what carries the public port to the serving instances.

``control`` starts, switches and drains them from the controller; ``reuseport`` models the
public port's ``SO_REUSEPORT`` group and its steering program. Two modules run in other
processes: ``hook`` in the forwarder units (``ExecStartPost=``, ``ExecStop=``) and ``proxy`` as
``bluegreen-proxy@PORT.service``. ``haproxy`` configures ``bluegreen-haproxy.service``.
"""
