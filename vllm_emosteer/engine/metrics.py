"""Prometheus counters of steered traffic, exported on the server's /metrics with vLLM's own metrics."""

from prometheus_client import Counter, Gauge

REQUESTS = Counter(
    "emosteer_requests", "Requests admitted by an emosteer engine, by whether they are steered", ["steered"]
)
EMOTION_REQUESTS = Counter("emosteer_emotion_requests", "Steered requests that include each emotion", ["emotion"])
INTENSITY = Counter(
    "emosteer_emotion_intensity", "Sum of |intensity| asked for each emotion (divide by the request count)",
    ["emotion"],
)

SETS_LOADED = Gauge("emosteer_vector_sets", "Vector sets loaded in the engine", multiprocess_mode="livemostrecent")
SET_UPDATES = Counter(
    "emosteer_set_updates", "Runtime changes of the vector sets, by action (load, replace, unload) and outcome "
    "(ok; refused: bad input, flag off, in use, no room; failed: the workers' RPC failed)", ["action", "outcome"],
)


def count_set_update(action: str, outcome: str) -> None:
    SET_UPDATES.labels(action=action, outcome=outcome).inc()


def count_request(spec) -> None:
    REQUESTS.labels(steered="true" if spec is not None else "false").inc()
    if spec is not None:
        for emotion, intensity in spec.intensities:
            EMOTION_REQUESTS.labels(emotion=emotion).inc()
            INTENSITY.labels(emotion=emotion).inc(abs(intensity))
