"""``/metrics`` after known traffic, summed over two workers."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Api, clients_on_distinct_workers, open_api
from tests.support import ServerProcess, wait_until

pytestmark = pytest.mark.redis


async def _metrics(api: Api) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``name{label="v"}`` → value."""
    response = await api.http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_count_the_traffic_of_every_worker(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with open_api(two_workers) as api:
        await api.create_channel(channel_name)
        before = await _metrics(api)
        async with AsyncExitStack() as stack:
            clients = await clients_on_distinct_workers(stack, two_workers, 2)
            for client in clients:
                await client.subscribe(channel_name)
            ids = await api.publish_many(channel_name, 5)
            for client in clients:
                assert await client.message_ids(5) == ids
            # One more connection recovers from the start: a complete replay.
            late = clients[0]
            await late.send({"op": "unsubscribe", "id": "u", "channel": channel_name})
            assert (await late.recv())["op"] == "unsubscribed"
            answer = await late.subscribe(channel_name, since="0-0")
            assert answer["recovered"] is True
            assert len(await late.message_ids(5)) == 5

            # Any worker answers for both: ask a few times, the sums never differ.
            for _ in range(4):
                now = await _metrics(api)
                assert now["herald_connections"] == before["herald_connections"] + 2
                assert now["herald_subscriptions"] == before["herald_subscriptions"] + 2
                assert now["herald_topics"] == before["herald_topics"] + 2  # one per worker
                published = now["herald_messages_published_total"]
                assert published - before["herald_messages_published_total"] == 5
                delivered = now["herald_messages_delivered_total"]
                assert delivered - before["herald_messages_delivered_total"] == 10
                recovered = 'herald_recoveries_total{recovered="true"}'
                assert now[recovered] - before.get(recovered, 0) == 1
                assert now["herald_publish_fanout_seconds_count"] >= 0

        async def all_gone() -> bool:
            now = await _metrics(api)
            return now["herald_connections"] == before["herald_connections"] and (
                now["herald_subscriptions"] == before["herald_subscriptions"]
            )

        await wait_until(all_gone)
