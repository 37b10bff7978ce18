"""The wire layer: bytes on HTTP below every adapter (web, SOAP) and every outbound client (XDS, RAD-69).

One place for what each of them used to parse or write on its own: Content-Type and Accept
(:mod:`media`), multipart/related in and out (:mod:`multipart`), MTOM/XOP on top of it (:mod:`mtom`),
the hardened XML parser (:mod:`xml`), the HTTP error types (:mod:`errors`), the SOAP 1.2 envelope,
WS-Addressing and fault model (:mod:`soap`) and the ebRS RegistryResponse model (:mod:`ebrs`).  Nothing here imports
``xdsi.web``, ``xdsi.soap``, ``xdsi.xds``, ``xdsi.archive`` or ``xdsi.storage``: the dependency points
one way, from the adapters down to the wire.
"""
