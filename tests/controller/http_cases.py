"""Request cases both levels of HTTP tests send: in process (test_http_inprocess.py) and through the real
server with the openai client (test_openai_api.py)."""

# (extra chat fields, the `param` the 400 must name; None: any)
INVALID_FIELDS = [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, None),
    ({"stop": [f"s{i}" for i in range(20)]}, "stop"),
    ({"bogus_field": 1}, "bogus_field"),
    ({"logprobs": True}, None),
]

# (raw chat body, what the 400's message contains or its param names)
MALFORMED_BODIES = [
    (b"{not json", "not valid JSON"),
    (b'{"model": "tiny-llama-random"}', "messages"),
    (b'{"model": "tiny-llama-random", "messages": "hi"}', "messages"),
    (b'{"model": "tiny-llama-random", "messages": []}', "messages"),
]
