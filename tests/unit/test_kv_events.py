"""KV-cache events publish a steered block's key whole: a KV-aware router that reads a BlockStored event's token ids
and extra keys can compute the block hash the engine core computed (vLLM publishes other extra keys untagged, and
a bare string would read as a cache salt)."""

import time

from vllm import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core import block_pool, kv_cache_utils
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.request import Request

from vllm_emosteer.engine import prefix_cache
from vllm_emosteer.engine.prefix_cache import CACHE_KEY

BLOCK = 4


def test_a_router_can_hash_a_steered_block_from_its_kv_event():
    prefix_cache.install()
    kv_cache_utils.init_none_hash(sha256)
    tokens = list(range(100, 112))  # three full blocks; "response" mode steers from the last prompt token (11)
    params = SamplingParams(max_tokens=1, extra_args={CACHE_KEY: ["digests-fingerprint", "response"]})
    request = Request.from_engine_core_request(
        EngineCoreRequest(request_id="r", prompt_token_ids=tokens, mm_features=None, sampling_params=params,
                          pooling_params=None, arrival_time=time.time(), lora_request=None, cache_salt=None,
                          data_parallel_rank=None),
        kv_cache_utils.get_request_block_hasher(BLOCK, sha256))
    keys = [kv_cache_utils.generate_block_hash_extra_keys(request, start, start + BLOCK, 0)[0]
            for start in range(0, len(tokens), BLOCK)]
    published = block_pool.to_event_extra_keys(keys)  # what the engine core's BlockStored event carries
    assert published == [None, None, (("emosteer", "digests-fingerprint", 11),)]
    parent = None
    for index, start in enumerate(range(0, len(tokens), BLOCK)):
        parent = kv_cache_utils.hash_block_tokens(sha256, parent, tokens[start:start + BLOCK], published[index])
        assert parent == request.block_hashes[index], f"block {index}"
