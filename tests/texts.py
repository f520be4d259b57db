"""Varied prompt texts from the standard library's own docs (stable for a Python version)."""

from __future__ import annotations

import argparse
import collections
import email
import json
import logging
import re
import string
import textwrap
import unittest

SHORT = [
    "Here is a simple geography fact that every student knows: the capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Translate the following sentence to French: The weather is nice today.",
    "Continue this sequence of Fibonacci numbers, separated by commas: 1, 2, 3, 5, 8, 13,",
    "You are a poet. Write a short haiku about the sea at night, under the moon.",
    "Q: What is the boiling point of water at sea level?\nA:",
    "-- count users per name\nSELECT name, COUNT(*) AS n FROM users GROUP BY",
    "Once upon a time, in a land far away, there lived a",
    "In painting and in colour theory as taught in school, the three primary colours are",
    "import numpy as np\nx = np.arange(10)\n# compute the mean of x\n",
]


def _docs() -> list[str]:
    mods = [json, re, collections, logging, argparse, unittest, textwrap, email, string]
    return [textwrap.dedent(m.__doc__ or "") for m in mods] + [
        textwrap.dedent(f.__doc__ or "") for f in (re.sub, json.dumps, logging.basicConfig)
    ]


def varied_prompts() -> list[str]:
    """Twenty-odd prompts from about 10 to about 2,000 tokens."""
    docs = [d for d in _docs() if d.strip()]
    big = "\n\n".join(docs)
    prompts = list(SHORT)
    for i, doc in enumerate(docs[:6]):
        prompts.append(doc[: 400 + 500 * i] + "\n\nSummary of the text above:")
    for chars in (3000, 4500, 6000, 8300):
        start = (chars * 7) % max(1, len(big) - chars)
        prompts.append(big[start : start + chars] + "\n\nIn short,")
    return prompts
