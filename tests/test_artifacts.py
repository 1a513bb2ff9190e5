

def test_atomic_files_get_the_users_umask(tmp_path):
    """mkstemp makes files owner-only (0600); an artifact is for sharing like any file the user writes."""
    import os

    from llm_maker.artifacts import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            atomic_write_text(d / "b.txt", "y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "b.txt").stat().st_mode & 0o777 == 0o644
