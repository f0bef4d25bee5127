"""`klein up --tls-cert PATH --tls-key PATH` (or KLEIN_TLS_CERT, KLEIN_TLS_KEY): both or neither, existing files;
the URLs it prints are then https."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.embedded import tls_files
from ops.network import reachable_at
from ops.up import up


def test_both_files_or_neither(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    assert tls_files({}) is None and tls_files({"KLEIN_TLS_CERT": "", "KLEIN_TLS_KEY": ""}) is None
    assert tls_files({"KLEIN_TLS_CERT": str(cert), "KLEIN_TLS_KEY": str(key)}) == (str(cert), str(key))
    with pytest.raises(ValueError, match="give both"):
        tls_files({"KLEIN_TLS_CERT": str(cert)})
    with pytest.raises(ValueError, match="KLEIN_TLS_KEY: no such file"):
        tls_files({"KLEIN_TLS_CERT": str(cert), "KLEIN_TLS_KEY": str(tmp_path / "missing.key")})


def test_klein_up_refuses_half_a_tls_setting_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        up(["--data-dir", str(tmp_path / "data"), "--tls-cert", str(tmp_path / "server.crt")])
    assert refused.value.code == 2 and "give both" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_the_printed_urls_say_https() -> None:
    assert reachable_at("127.0.0.1", 8443, [], "https") == ["https://127.0.0.1:8443"]
    assert reachable_at("0.0.0.0", 8443, ["localhost", "127.0.0.1", "10.1.2.3"], "https") == [
        "https://127.0.0.1:8443",
        "https://10.1.2.3:8443",
    ]
