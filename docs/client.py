"""The README's booking client: hold and confirm a place, solving the proof of work."""

import hashlib, itertools, json, os, urllib.request
API = os.environ.get("GUICHET_API", "http://127.0.0.1:8080")
def call(method, path, body=None, token=None):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    return json.load(urllib.request.urlopen(urllib.request.Request(API + path, json.dumps(body).encode() if body else None, headers, method=method)))
def solve(c):  # one nonce per puzzle i: SHA-256(challenge:i:nonce) starts with `difficulty` zero bits
    return [next(n for n in map(str, itertools.count()) if int.from_bytes(hashlib.sha256(f"{c['challenge']}:{i}:{n}".encode()).digest(), "big") >> (256 - c["difficulty"]) == 0) for i in range(c["puzzles"])]
release = call("GET", "/v1/releases?site=bobigny&procedure=titre-sejour-renouvellement")["releases"][0]["id"]
slot = next(s for s in call("GET", f"/v1/releases/{release}/slots")["slots"] if s["free"])
challenge = call("POST", "/v1/challenges", {"release": release})
hold = call("POST", "/v1/holds", {"slot_id": slot["id"], "challenge": challenge["challenge"], "nonces": solve(challenge)})
print(json.dumps(call("POST", f"/v1/holds/{hold['hold_id']}/confirm", {"applicant": {"family_name": "Diallo", "given_names": "Aminata", "birth_date": "1990-04-01", "id_number": "99 1234 5678", "email": "aminata@example.org"}}, hold["hold_token"])))
