#!/usr/bin/env python3
"""Scrapes an OpenMetrics endpoint and parses it with Python's
prometheus_client (an independent parser), printing one JSON object:
{family: {"type": ..., "samples": [[name, labels, value], ...]}}.

Usage: scrape.py URL. Exits 3 when prometheus_client is missing, 2 when the
text does not parse.
"""
import json
import sys
import urllib.request

try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    print("scrape.py: python3 module prometheus_client is missing (pip install prometheus_client)", file=sys.stderr)
    sys.exit(3)

with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    content_type = r.headers.get("Content-Type", "")
    text = r.read().decode("utf-8")
try:
    families = {}
    for f in text_string_to_metric_families(text):
        families[f.name] = {
            "type": f.type,
            "samples": [[s.name, s.labels, s.value] for s in f.samples],
        }
except Exception as e:  # the parser's own error types vary by version
    print(f"scrape.py: not OpenMetrics text: {e}", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"contentType": content_type, "families": families}))
