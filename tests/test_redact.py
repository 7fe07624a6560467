"""jobs.redact: the one redaction of URLs, secret keys and configs."""

from __future__ import annotations

import pytest

from jobs.redact import has_url_password, is_secret_key, redact_config, redact_url, redact_value


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("https://alice:pa55@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
        ("postgresql://u:p@db:5432/mlflow", "postgresql://u:***@db:5432/mlflow"),
        ("https://mlflow.example.com/?token=abc&x=1", "https://mlflow.example.com/?token=***&x=1"),
        ("http://h/api?access_token=t0k&api_key=k&run=3", "http://h/api?access_token=***&api_key=***&run=3"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&X-Amz-Expires=60",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        ("sig=1 at http://h/x?sig=zz", "sig=1 at http://h/x?sig=***"),
        ("run on http://a:b@h1 and http://c:d@h2/p", "run on http://a:***@h1 and http://c:***@h2/p"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("http://user@host:5000/path?run_id=7", "http://user@host:5000/path?run_id=7"),
        ("no url here: token=abc", "no url here: token=abc"),
    ],
)
def test_redact_url(text: str, want: str) -> None:
    assert redact_url(text) == want
    assert has_url_password(text) == (want != text)


def test_secret_keys_values_and_configs() -> None:
    for key in ("data.storage.secret_access_key", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID"):
        assert is_secret_key(key), key
    for key in ("model.num_classes", "tracking.tracking_uri", "MLFLOW_TRACKING_USERNAME", "design"):
        assert not is_secret_key(key), key
    assert redact_value("MLFLOW_TRACKING_TOKEN", "abc") == "***"
    assert redact_value("MLFLOW_TRACKING_URI", "http://u:p@h?token=t") == "http://u:***@h?token=***"
    config = {"tracking": {"tracking_uri": "http://u:p@h", "password": "x"}, "items": ["http://a:b@c"], "n": 3}
    assert redact_config(config) == {
        "tracking": {"tracking_uri": "http://u:***@h"},
        "items": ["http://a:***@c"],
        "n": 3,
    }
