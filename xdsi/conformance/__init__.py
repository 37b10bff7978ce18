"""``xdsi conformance URL``: the Connectathon Imaging Document Source cases against any IDS endpoint.

subject: which study, series and instances to ask for (a KOS, or QIDO-RS).
runner:  zeep-built requests, streamed answers, the checks every answer must pass.
cases:   the NIST ids_2018-48xx RAD-69 cases and WADO-WS basics.
report:  the pass/fail table and JUnit XML.
"""
