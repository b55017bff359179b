"""The pseudonym's MAC (rules/pseudonym.py) is HMAC-SHA256 as the standard library computes it,
for keys shorter and longer than a block and messages of every length; the one-id and the many-id
paths give the same pseudonyms, an id that normalises to nothing gives ''."""
from __future__ import annotations

import hmac
import random

import pytest

from tracecode.rules.insured import normalise
from tracecode.rules.pseudonym import Pseudonymizer


@pytest.mark.parametrize("key_len", [32, 63, 64, 65, 100, 200])
def test_the_mac_is_hmac_sha256(key_len):
    rnd = random.Random(key_len)
    key = bytes(rnd.randrange(256) for _ in range(key_len))
    p = Pseudonymizer(key, "k9")
    for n in list(range(130)) + [1000, 5000]:
        data = bytes(rnd.randrange(256) for _ in range(n))
        assert p.mac(data) == hmac.digest(key, data, "sha256")


def test_one_and_many_give_the_same_pseudonyms_as_hmac_says():
    rnd = random.Random(5)
    key = bytes(rnd.randrange(256) for _ in range(48))
    p = Pseudonymizer(key, "k2")
    ids = ["110101199003070011", "11010119900307001x", "１１０１０１１９９００３０７００１１", " ", "", "MC-778 12", "张三"]
    ids += ["".join(rnd.choice("0123456789X -") for _ in range(rnd.randrange(1, 25))) for _ in range(500)]
    want = [f"k2.{hmac.digest(key, normalise(i).encode(), 'sha256')[:16].hex()}" if normalise(i) else "" for i in ids]
    assert p.pseudonym_many(ids) == want == [p.pseudonym(i) for i in ids]
    assert p.pseudonym_many_normalised([normalise(i) for i in ids]) == want


def test_a_pickled_pseudonymizer_gives_the_same_pseudonyms():
    """As the leads engine's worker processes and Spark's executors receive it."""
    import pickle

    p = Pseudonymizer(b"s" * 40, "k3")
    q = pickle.loads(pickle.dumps(p))
    assert (q.key_id, q.pseudonym_many(["110101199003070011", "A1"])) == \
        (p.key_id, p.pseudonym_many(["110101199003070011", "A1"]))
