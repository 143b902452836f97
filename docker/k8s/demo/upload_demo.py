"""Upload the demo inputs of `sftpipe run` to an S3 prefix (the kind demo's data Job).

    python3 upload_demo.py s3://bucket/prefix CACHE_DIR

Writes `<prefix>/chat.jsonl` and `<prefix>/smollm2-135m-instruct/`, creating the bucket if
needed. The model's manifest (`sftpipe-demo.json`) is uploaded last and marks a complete
upload: a rerun that finds it (and the data) does nothing. S3 settings come from the
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sftpipe import storage
from sftpipe.apps import demo


def ensure_bucket(bucket: str) -> None:
    from botocore.exceptions import ClientError

    client = storage.s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)
        print(f"[demo] created bucket {bucket}", flush=True)


def upload_demo(prefix: str, cache: Path) -> tuple[str, str]:
    """Upload once; returns (data_uri, base_model_uri)."""
    prefix = prefix.rstrip("/")
    data_uri = f"{prefix}/chat.jsonl"
    model_uri = f"{prefix}/{demo.DEMO_MODEL_DIRNAME}"
    bucket, _ = storage.split_s3(prefix)
    ensure_bucket(bucket)
    present = set(storage.list_objects(prefix))
    _, key_prefix = storage.split_s3(prefix)
    key = (key_prefix + "/" if key_prefix else "") + "{}"
    if {key.format("chat.jsonl"), key.format(f"{demo.DEMO_MODEL_DIRNAME}/{demo.MANIFEST}")} <= (
        present
    ):
        print(f"[demo] already uploaded: {data_uri} {model_uri}", flush=True)
        return data_uri, model_uri
    data = demo.prepare_demo_data(cache)
    storage.upload_file(data, data_uri)
    model = demo.prepare_demo_model(cache)
    files = sorted(p for p in model.rglob("*") if p.is_file() and p.name != demo.MANIFEST)
    for path in [*files, model / demo.MANIFEST]:  # the manifest last: it marks completion
        storage.upload_file(path, f"{model_uri}/{path.relative_to(model).as_posix()}")
    print(f"[demo] uploaded {data_uri} and {model_uri}", flush=True)
    return data_uri, model_uri


if __name__ == "__main__":
    upload_demo(sys.argv[1], Path(sys.argv[2]))
