"""PIXm (IHE ITI-83, FHIR ``$ihe-pix``): the affinity-domain Patient ID of a local one, asked of the PIX Manager.

Used by :mod:`xdsi.xds.patients` when ``[xds] pix_url`` is set and the
``[[xds.patient_ids]]`` table has no row for the patient.  Only an unambiguous
answer is taken: exactly one identifier in the affinity domain.  A PIX Manager
that does not know the patient (404, ITI-83 2:3.83.4.2.3) is "not known"; one
that cannot be reached or answers anything else is an error, and the study
waits, rather than being published under a guess.
"""

from __future__ import annotations

import requests

from xdsi.security.clock import observe

__all__ = ["PixError", "pix_lookup"]


class PixError(RuntimeError):
    """The PIX Manager could not give an answer to rely on (unreachable, refused, ambiguous)."""


def pix_lookup(pix_url: str, local_id: str, local_oid: str, target_oid: str, *, timeout: float = 30.0) -> str | None:
    """The patient's ID in ``target_oid``, None if the PIX Manager does not know it; :class:`PixError` otherwise."""
    url = pix_url.rstrip("/") + "/Patient/$ihe-pix"
    params = {"sourceIdentifier": f"urn:oid:{local_oid}|{local_id}", "targetSystem": f"urn:oid:{target_oid}"}
    try:
        # hooks: Consistent Time, the PIX Manager's Date against our clock (xdsi status)
        r = requests.get(url, params=params, headers={"Accept": "application/fhir+json"}, timeout=timeout, hooks={"response": observe})
    except requests.RequestException as exc:
        raise PixError(f"PIX Manager {url} unreachable: {exc}") from None
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise PixError(f"PIX Manager {url} answered HTTP {r.status_code}: {r.text[:300]}")
    try:
        doc = r.json()
        found = {
            p["valueIdentifier"]["value"]
            for p in doc.get("parameter", [])
            if p.get("name") == "targetIdentifier" and p.get("valueIdentifier", {}).get("system") == f"urn:oid:{target_oid}"
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PixError(f"PIX Manager {url}: not a PIXm Parameters answer ({exc})") from None
    if doc.get("resourceType") != "Parameters":
        raise PixError(f"PIX Manager {url}: answered a {doc.get('resourceType')!r}, not Parameters")
    if len(found) > 1:
        raise PixError(f"PIX Manager {url}: {len(found)} different IDs in {target_oid} for {local_id} ({', '.join(sorted(found))})")
    return next(iter(found), None)
