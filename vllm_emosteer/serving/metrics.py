"""Prometheus counters of steered traffic, exported on the server's /metrics with vLLM's own metrics."""

from prometheus_client import Counter

REQUESTS = Counter(
    "emosteer_requests", "Requests admitted by an emosteer engine, by whether they are steered", ["steered"]
)
EMOTION_REQUESTS = Counter("emosteer_emotion_requests", "Steered requests that include each emotion", ["emotion"])
INTENSITY = Counter(
    "emosteer_emotion_intensity", "Sum of |intensity| asked for each emotion (divide by the request count)",
    ["emotion"],
)


def count_request(spec) -> None:
    REQUESTS.labels(steered="true" if spec is not None else "false").inc()
    if spec is not None:
        for emotion, intensity in spec.intensities:
            EMOTION_REQUESTS.labels(emotion=emotion).inc()
            INTENSITY.labels(emotion=emotion).inc(abs(intensity))
