# ruff: noqa
"""What bandit, with the project's configuration (pyproject.toml), must flag.

A line ending in ``# flags: TEST_ID`` must be reported with that test id; no other line may be.
The assert is not reported: B101 is the one test the configuration skips. Never imported.
"""

import hashlib
import pickle  # flags: B403
import subprocess  # flags: B404

import yaml


def unsafe(command, text, blob, expression, user_is_admin):
    subprocess.call(command, shell=True)  # flags: B602
    document = yaml.load(text)  # flags: B506
    digest = hashlib.md5(blob).hexdigest()  # flags: B324
    password = "hunter2"  # flags: B105
    value = pickle.loads(blob)  # flags: B301
    result = eval(expression)  # flags: B307
    assert user_is_admin
    return document, digest, password, value, result


def justified(command):
    return subprocess.run(["git", "--version"], check=True)  # nosec B603 B607 # a fixed command, no shell
