"""`hica-bench bench`: bad input is one line and exit code 2, in this process (split from tests/system/test_bench.py)."""

from test_check import cli


def test_bad_input_exits_2_with_one_line(capsys, medmnist_root, tmp_path):
    def bench(*extra):
        return cli(capsys, "-p", "pixel_encoder", "bench", "--encoder", "pixels", "--data-root", medmnist_root,
                   "--cache-dir", tmp_path / "cache", "--out", tmp_path / "bench.json", *extra)

    for extra, message in ((("--split", "test", "--images", "100000"), "fewer than --images 100000"),
                           (("--split", "dev"), "--split"),
                           (("--naive-batch-size", "0"), "--naive-batch-size"),
                           (("--repeats", "0"), "--repeats"),
                           (("--threads", "-1"), "--threads"),
                           (("--backend", "tpu"), "--backend")):
        result = bench(*extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("hica-bench: error:")
