"""Routing rules (issue 15, item 3): instances forwarded to peers by C-STORE or STOW-RS as they arrive.

* :mod:`xdsi.routing.settings`: ``[[routes]]`` and ``[routing]`` from the TOML file;
* :mod:`xdsi.routing.conditions`: what an instance is matched on (the extension point for
  order-derived attributes from HL7 lives there);
* :mod:`xdsi.routing.models`: the durable queue (index rows, migration ``0006_routing_queue``);
* :mod:`xdsi.routing.queue`: rules evaluated into queue rows, rows claimed and settled;
* :mod:`xdsi.routing.senders`: C-STORE (through :mod:`xdsi.dimse.sending`) and STOW-RS;
* :mod:`xdsi.routing.service`: the worker thread (``start()``/``stop()``), run once per node.

Nothing is imported here: :mod:`xdsi.index.models` imports :mod:`xdsi.routing.models` to
register the tables, and must not pull the engine in with it.
"""
