import pytest

from rlkit.runtime.checkpoint import check_written


def test_a_resume_point_is_refused_when_a_rank_wrote_files_the_driver_does_not_see(tmp_path):
    """The driver commits a point only if every file the ranks say they wrote is in its view of the folder (a rank on
    a node whose run folder is another disk writes where the driver never looks)."""
    (tmp_path / "dcp").mkdir()
    for name in ("rank0.pt", "dcp/.metadata"):
        (tmp_path / name).write_text("x")
    check_written(tmp_path, ["rank0.pt", "dcp/.metadata"])
    with pytest.raises(RuntimeError, match=r"^resume point: rank1.pt written by the trainer ranks are not in .* on "
                                           "the driver's node; logging.output_dir must be storage every node sees"):
        check_written(tmp_path, ["rank0.pt", "dcp/.metadata", "rank1.pt"])
