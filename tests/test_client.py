"""iskander.client against real servers (issue 8): discovery, infer from Arrow, pandas and polars,
the streaming form, typed errors carrying the server's message, statistics, token and TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from data import tabular_batch, two_tower_batch
from helpers import serving
from iskander.client import IskanderClient, InvalidArgument, NotFound, Unauthenticated, Unavailable
from models import reference
from test_tls import pki  # noqa: F401  (module fixture: a CA, server and client certificates)


@pytest.fixture(scope="module")
def client(server):
    with IskanderClient(server.flight_uri.removeprefix("grpc://"), timeout=30) as c:
        yield c


def _tabular_reference(models_dir, feeds):
    return reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)


def test_models_and_schemas(client, server):
    names = {m.name for m in client.models()}
    assert {"tabular", "two_tower", "dtypes", "sklearn"} <= names
    info = client.model("two_tower")
    raw = flight.connect(server.flight_uri)
    assert info.input_schema.equals(raw.get_schema(flight.FlightDescriptor.for_path("two_tower")).schema)
    raw.close()
    assert client.input_schema("two_tower").names == ["user_id", "item_id", "user_features", "item_features"]
    assert client.output_schema("two_tower").names == ["user_id", "item_id", "score", "user_embedding"]
    assert info.passthrough == ["user_id", "item_id"]
    assert info.outputs == ["score", "user_embedding"]
    assert client.model("tabular", "2").version == "2"


def test_infer_arrow_table_matches_onnxruntime(client, models_dir):
    batch, feeds = two_tower_batch(300, seed=4)
    table = pa.Table.from_batches([batch.slice(0, 100), batch.slice(100, 200)])  # two batches, one stream
    table = table.append_column("unused", pa.array(np.arange(300)))  # not the model's: not sent
    out = client.infer("two_tower", table)
    assert out.num_rows == 300 and out.column_names == ["user_id", "item_id", "score", "user_embedding"]
    ref = reference(models_dir / "two_tower.onnx", feeds)
    np.testing.assert_array_equal(out.column("score").to_numpy(), ref["score"])
    emb = out.column("user_embedding").combine_chunks().flatten().to_numpy().reshape(300, 32)
    np.testing.assert_array_equal(emb, ref["user_embedding"])
    assert out.column("user_id").to_pylist() == batch.column("user_id").to_pylist()


def test_infer_pandas_dataframe(client, models_dir):
    batch, feeds = tabular_batch(50, seed=2)
    # pandas has no fixed-size list: features arrive as arrays (list<float>), conformed by the client
    frame = pd.DataFrame({"entity_id": [f"p{i}" for i in range(50)], "features": list(feeds["numeric"]),
                          "category": feeds["category"], "extra": np.ones(50)})
    out = client.infer("tabular", frame)
    np.testing.assert_array_equal(out.column("score").to_numpy(), _tabular_reference(models_dir, feeds))
    assert out.column("entity_id").to_pylist() == [f"p{i}" for i in range(50)]


def test_infer_polars_dataframe(client, models_dir):
    _, feeds = tabular_batch(40, seed=3)
    frame = pl.DataFrame({"entity_id": [f"q{i}" for i in range(40)],  # polars strings are large_string/view
                          "features": pl.Series(feeds["numeric"], dtype=pl.Array(pl.Float32, 4)),
                          "category": feeds["category"]})
    out = client.infer("tabular", frame)
    np.testing.assert_array_equal(out.column("score").to_numpy(), _tabular_reference(models_dir, feeds))
    assert pl.from_arrow(out).get_column("entity_id").to_list() == [f"q{i}" for i in range(40)]
    # with_inputs: the frame's own columns (polars types kept) followed by the outputs
    joined = pl.from_arrow(client.infer("tabular", frame.with_columns(pl.lit("x").alias("tag")), with_inputs=True))
    assert joined.columns == ["entity_id", "features", "category", "tag", "score"]
    assert joined.get_column("tag").to_list() == ["x"] * 40
    np.testing.assert_array_equal(joined.get_column("score").to_numpy(), _tabular_reference(models_dir, feeds))


def test_unknown_model_is_not_found_with_the_servers_message(client):
    with pytest.raises(NotFound) as err:
        client.infer("nope", tabular_batch(2)[0])
    assert err.value.message.startswith("unknown model 'nope'; served models: ")
    assert "tabular" in err.value.message and err.value.model == "nope" and err.value.code == "NOT_FOUND"
    assert str(err.value).startswith("[NOT_FOUND] unknown model 'nope'")


def test_wrong_type_is_invalid_argument_naming_the_column(client):
    batch, feeds = tabular_batch(5)
    wrong = batch.set_column(2, "category", pa.array(feeds["category"].astype(np.float64)))
    with pytest.raises(InvalidArgument) as err:
        client.infer("tabular", wrong)
    assert err.value.column == "category"
    assert err.value.message == "column 'category' of model 'tabular' has type float64, model expects int64"
    assert err.value.details["expected"] == "int64" and err.value.details["got"] == "float64"


def test_null_names_the_row_and_missing_column_is_caught_locally(client):
    batch, _ = tabular_batch(4)
    nulls = batch.set_column(2, "category", pa.array([1, None, 3, 4], pa.int64()))
    with pytest.raises(InvalidArgument) as err:
        client.infer("tabular", nulls)
    assert err.value.details["row"] == 1 and "has a null at row 1" in err.value.message
    with pytest.raises(InvalidArgument, match="column 'category' of model 'tabular' is missing"):
        client.infer("tabular", batch.drop_columns(["category"]))


def test_stream_yields_each_answer_before_the_input_is_exhausted(client, models_dir):
    pulled = []
    feeds_seen = []

    def batches():
        for i in range(8):
            pulled.append(i)
            batch, feeds = tabular_batch(64, seed=100 + i)
            feeds_seen.append(feeds)
            yield batch

    answers = []
    for k, answer in enumerate(client.stream("tabular", batches(), window=1)):
        # window=1: batch k+1 is written only after answer k is read, so the generator is at most
        # one batch ahead of the answers (it pulls the next batch before waiting for credit)
        assert len(pulled) <= k + 2
        answers.append(answer)
    assert len(answers) == 8
    for answer, feeds in zip(answers, feeds_seen):
        np.testing.assert_array_equal(answer.column("score").to_numpy(), _tabular_reference(models_dir, feeds))


def test_stream_closed_early_cancels_and_the_client_still_works(client):
    def endless():
        i = 0
        while True:
            i += 1
            yield tabular_batch(16, seed=i)[0]

    got = 0
    for _ in client.stream("tabular", endless()):
        got += 1
        if got == 3:
            break
    assert got == 3
    assert client.infer("tabular", tabular_batch(3)[0]).num_rows == 3
    assert threading.active_count() < 20  # the feeder thread ended


def test_stream_reports_a_server_error_mid_stream(client):
    good, feeds = tabular_batch(8)
    bad = good.set_column(2, "category", pa.array([None] * 8, pa.int64()))
    answers = []
    with pytest.raises(InvalidArgument, match="has a null at row 0"):
        for answer in client.stream("tabular", [good, good, bad, good], window=1):
            answers.append(answer)
    assert len(answers) == 2  # answers before the bad batch arrive


def test_statistics_count_client_requests(client):
    before = client.statistics("tabular", "1")[0]["inference_count"]
    client.infer("tabular", tabular_batch(7)[0], version="1")
    after = client.statistics("tabular", "1")[0]
    assert after["inference_count"] == before + 7 and after["name"] == "tabular"
    assert client.health()["live"] is True


def test_unreachable_server_is_unavailable():
    with IskanderClient("127.0.0.1:9", timeout=5) as c, pytest.raises(Unavailable):
        c.models()


def test_token_and_mutual_tls(models_dir, pki, tmp_path):  # noqa: F811
    config = (f'[server]\ntls_cert = "{pki["server_cert"]}"\ntls_key = "{pki["server_key"]}"\n'
              f'tls_client_ca = "{pki["ca"]}"\nauth_tokens = ["s3cret"]\n\n'
              f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n')
    tls = {"tls_root_certs": pki["ca"], "cert_chain": pki["client_cert"], "private_key": pki["client_key"]}
    with serving(tmp_path, config) as server:
        target = server.flight_uri.removeprefix("grpc+tls://")
        with IskanderClient(target, token="s3cret", timeout=10, **tls) as c:
            assert c.location.startswith("grpc+tls://")
            batch, feeds = tabular_batch(6)
            np.testing.assert_array_equal(c.infer("tabular", batch).column("score").to_numpy(),
                                          _tabular_reference(models_dir, feeds))
        with IskanderClient(target, token="wrong", timeout=10, **tls) as c, pytest.raises(Unauthenticated) as err:
            c.models()
        assert "missing or invalid bearer token" in err.value.message
        with IskanderClient(target, token="s3cret", timeout=10, tls_root_certs=pki["ca"]) as c, \
                pytest.raises(Unavailable):  # no client certificate: the TLS handshake fails
            c.models()
        # the score command takes the same settings (the token from the environment)
        src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
        pq.write_table(pa.Table.from_batches([tabular_batch(100)[0]]), src)
        args = [sys.executable, "-m", "iskander", "score", "--server", target, "--model", "tabular",
                "--input", str(src), "--output", str(out), "--tls-root-cert", str(pki["ca"]),
                "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
        run = subprocess.run(args, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "ISKANDER_TOKEN": "s3cret"})
        assert run.returncode == 0, run.stderr
        assert pq.read_table(out).num_rows == 100
        run = subprocess.run(args + ["--token", "nope", "--overwrite"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and "[UNAUTHENTICATED] missing or invalid bearer token" in run.stderr
