#!/usr/bin/env python3
"""Checks JSON documents against uvmctl's JSON Schema with python-jsonschema,
the validator check-jsonschema wraps: an independent implementation, not the
types uvmctl's schema is generated from.

Usage: check.py SCHEMA < DOCUMENTS   (one JSON document per line)
Prints, per document, `accepted` or `refused <first error's path>: <message>`.
Exits 0 when it checked every document, 2 when the schema itself is not valid
draft 2020-12, 3 when jsonschema is missing.
"""
import json
import sys

try:
    import jsonschema
except ImportError:
    print("check.py: python3 module jsonschema is missing (pip install jsonschema)", file=sys.stderr)
    sys.exit(3)

with open(sys.argv[1], encoding="utf-8") as f:
    schema = json.load(f)
try:
    jsonschema.Draft202012Validator.check_schema(schema)
except jsonschema.SchemaError as e:
    print(f"check.py: not a valid draft 2020-12 schema: {e.message}", file=sys.stderr)
    sys.exit(2)
validator = jsonschema.Draft202012Validator(schema)
for line in sys.stdin:
    doc = json.loads(line)
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path)
        print(f"refused {path}: {e.message[:200]}".replace("\n", " "))
    else:
        print("accepted")
