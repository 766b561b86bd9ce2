from pathlib import Path

import pytest

from reidkit.data.datasets import (
    DATASETS,
    LIST_DATASETS,
    canonical_name,
    manifest_path,
    parse_market_name,
    parse_msmt17_camera,
    read_manifest,
    strip_archive_suffix,
)
from reidkit.errors import DatasetError


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("market", "market1501"),
        ("Market", "market1501"),
        ("MARKET1501", "market1501"),
        ("duke", "dukemtmc-reid"),
        ("DukeMTMC-reID", "dukemtmc-reid"),
        ("cuhk03", "cuhk03-np"),
        ("cuhk03-np", "cuhk03-np"),
        ("msmt", "msmt17"),
        ("MSMT17", "msmt17"),
        ("Synthetic", "synthetic"),
        ("custom", "custom"),
    ],
)
def test_short_names_and_case_resolve_to_the_canonical_name(typed, canonical):
    assert canonical_name(typed) == canonical


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(DatasetError) as err:
        canonical_name("viper")
    message = str(err.value)
    assert "'viper'" in message
    for name in ("market1501", "dukemtmc-reid", "cuhk03-np", "msmt17", "custom", "synthetic"):
        assert name in message
    assert "msmt)" in message  # the short names


def test_published_counts_are_the_design_tables():
    market = DATASETS["market1501"].variant().counts
    assert (market.train_ids, market.train_images) == (751, 12_936)
    assert (market.query_ids, market.query_images) == (750, 3_368)
    assert market.gallery_images == 19_732 - 3_819
    duke = DATASETS["dukemtmc-reid"].variant().counts
    assert (duke.train_images, duke.query_images, duke.gallery_images) == (16_522, 2_228, 17_661)
    detected = DATASETS["cuhk03-np"].variant("detected").counts
    labeled = DATASETS["cuhk03-np"].variant("labeled").counts
    assert (detected.train_images, detected.gallery_images) == (7_365, 5_332)
    assert (labeled.train_images, labeled.gallery_images) == (7_368, 5_328)
    assert [DATASETS[n].cameras for n in ("market1501", "dukemtmc-reid", "cuhk03-np")] == [6, 8, 2]
    msmt = LIST_DATASETS["msmt17"].counts  # Wei et al., CVPR 2018; train = train + val lists
    assert (msmt.train_ids, msmt.train_images) == (1_041, 30_248 + 2_373)
    assert (msmt.query_ids, msmt.query_images, msmt.gallery_images) == (3_060, 11_659, 82_161)
    assert msmt.cameras == 15


def test_msmt17_releases_name_their_archives_and_image_folders():
    v1, v2 = LIST_DATASETS["msmt17"].releases
    assert (v1.folder, v1.archive) == ("MSMT17_V1", "MSMT17_V1.tar.gz")
    assert (v2.folder, v2.archive) == ("MSMT17_V2", "MSMT17_V2.zip")
    assert (
        v1.image_folders["list_val.txt"] == "train" and v1.image_folders["list_query.txt"] == "test"
    )
    assert v2.image_folders["list_train.txt"] == "mask_train_v2"
    assert v2.image_folders["list_gallery.txt"] == "mask_test_v2"


def test_labeled_boxes_default_to_their_own_folder():
    cuhk = DATASETS["cuhk03-np"]
    assert cuhk.variant("detected").default_name == "cuhk03-np"
    assert cuhk.variant("labeled").default_name == "cuhk03-np-labeled"
    assert cuhk.variant("labeled").subfolder == "labeled"


def test_variant_is_refused_where_it_does_not_apply():
    with pytest.raises(DatasetError, match="cuhk03-np only"):
        DATASETS["market1501"].variant("labeled")
    with pytest.raises(DatasetError, match="detected, labeled"):
        DATASETS["cuhk03-np"].variant("hand")


def test_archive_names_accept_zip_and_tar_forms():
    names = DATASETS["market1501"].archive_names
    assert "Market-1501-v15.09.15.zip" in names
    assert "Market-1501-v15.09.15.tar.gz" in names
    assert "Market-1501-v15.09.15.tar" in names
    assert strip_archive_suffix("cuhk03-np.TAR.GZ") == "cuhk03-np"


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        ("0002_c1s1_000451_03.jpg", (2, 1)),
        ("-1_c3s2_000001_01.jpg", (-1, 3)),
        ("0001_c2_f0046182.jpg", (1, 2)),
        ("0001_c1_1.png", (1, 1)),
    ],
)
def test_market_name_gives_pid_and_camera(name, ids):
    assert parse_market_name(name) == ids


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        ("0002_c12s1_000451_03.jpg", (2, 12)),  # Market's form with a two-digit camera
        ("0005_c10_f0012345.jpg", (5, 10)),  # DukeMTMC-reID's form
        ("0001_c11_1.png", (1, 11)),  # CUHK03-NP's form
        ("0000_c15s1_000451_00.jpg", (0, 15)),  # MSMT17 converted to Market's layout
        ("0003_c101s2_000001_00.jpg", (3, 101)),
    ],
)
def test_camera_ids_of_ten_and_more_keep_every_digit(name, ids):
    assert parse_market_name(name) == ids


@pytest.mark.parametrize(
    ("name", "camera"),
    [
        ("0000_000_01_0303morning_0015_0.jpg", 1),
        ("0123_045_12_0302noon_0321_1.jpg", 12),
        ("1040_007_15_0113afternoon_0890_2.jpg", 15),
        ("0003_019_10_0303morning_0040_0.jpg", 10),
    ],
)
def test_msmt17_name_gives_the_camera_of_its_third_field(name, camera):
    assert parse_msmt17_camera(name) == camera


@pytest.mark.parametrize(
    "name",
    [
        "0002_c1s1_000451_03.jpg",  # Market's form
        "0000_000_1_0303morning_0015_0.jpg",  # one digit
        "0000_000_123_0303morning_0015_0.jpg",  # three digits
        "0000_01_0303morning.jpg",
        "x0000_000_01_0303morning_0015_0.jpg",
    ],
)
def test_other_names_have_no_msmt17_camera(name):
    assert parse_msmt17_camera(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "2024-01-15_c1_0001.jpg",  # a date: dashes inside the leading number
        "frame-12-3_c1.jpg",
        "cam-_c2.png",
        "-_c1.jpg",
        "1-2_c1.jpg",
        "holiday_2019_c1.jpg",  # PID_cCAM in the middle of the name is not an identity
        "IMG_0001.jpg",
        "0001_cx.jpg",
        "\u0663_c1.jpg",  # a non-ASCII digit
    ],
)
def test_other_names_have_no_identity(name):
    assert parse_market_name(name) is None


def test_manifest_path_resolves_short_names_and_keeps_other_names(tmp_path):
    assert manifest_path(tmp_path, "duke") == tmp_path / "dukemtmc-reid" / "manifest.csv"
    assert manifest_path(tmp_path, "Market") == tmp_path / "market1501" / "manifest.csv"
    labeled = manifest_path(tmp_path, "cuhk03-np-labeled")
    assert labeled == tmp_path / "cuhk03-np-labeled" / "manifest.csv"


def test_missing_manifest_says_to_run_prepare(tmp_path):
    with pytest.raises(DatasetError, match=r"run `reidkit prepare market1501 .*` first"):
        read_manifest(manifest_path(tmp_path, "market"))


def test_missing_labeled_boxes_suggest_the_variant_option(tmp_path):
    with pytest.raises(DatasetError) as err:
        read_manifest(manifest_path(tmp_path, "cuhk03-np-labeled"))
    assert f"run `reidkit prepare cuhk03-np {tmp_path} --variant labeled` first" in str(err.value)


def test_missing_synthetic_set_suggests_preparing_it(tmp_path):
    with pytest.raises(DatasetError, match=r"run `reidkit prepare synthetic .*` first"):
        read_manifest(manifest_path(tmp_path, "synthetic"))


def test_missing_msmt17_suggests_preparing_it(tmp_path):
    with pytest.raises(DatasetError, match=rf"run `reidkit prepare msmt17 {tmp_path}` first"):
        read_manifest(manifest_path(tmp_path, "msmt"))


def test_unknown_name_lists_prepared_datasets_and_suggests_custom(tmp_path):
    for name in ("market1501", "my-set"):
        write_manifest(tmp_path / name, "path,pid,camid,split\n")
    (tmp_path / "notes").mkdir()  # a folder without a manifest is not a dataset
    with pytest.raises(DatasetError) as err:
        read_manifest(manifest_path(tmp_path, "my-sett"))
    message = str(err.value)
    assert f"datasets prepared in {tmp_path}: market1501, my-set;" in message
    assert f"`reidkit prepare custom {tmp_path} --source FOLDER_OR_CSV --name my-sett`" in message
    assert "reidkit prepare my-sett" not in message  # a command that would fail


def test_unknown_name_in_an_empty_root_says_none_is_prepared(tmp_path):
    with pytest.raises(DatasetError, match=r"datasets prepared in .*: none; to prepare"):
        read_manifest(manifest_path(tmp_path / "absent", "foo"))


def write_manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    path.write_text(text)
    return path


def test_manifest_paths_are_resolved_and_types_checked(tmp_path):
    path = write_manifest(
        tmp_path / "ds",
        "path,pid,camid,split\nimgs/a.jpg,3,1,train\n/abs/b.jpg,0,2,gallery\n",
    )
    frame = read_manifest(path)
    assert frame["path"].tolist() == [str(tmp_path / "ds" / "imgs" / "a.jpg"), "/abs/b.jpg"]
    assert frame["pid"].tolist() == [3, 0]
    assert str(frame["pid"].dtype) == "int64" and str(frame["camid"].dtype) == "int64"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("path,pid,split\na.jpg,1,train\n", "lacks column(s) camid"),
        ("path,pid,camid,split\na.jpg,1,1,test\n", "split 'test' is not one of"),
        ("path,pid,camid,split\na.jpg,x1,1,train\n", "pid 'x1' is not an integer"),
        ("path,pid,camid,split\na.jpg,1,1.5,train\n", "camid '1.5' is not an integer"),
        ("path,pid,camid,split\n,1,1,train\n", "line 2: empty path"),
    ],
)
def test_malformed_manifest_fails_naming_the_problem(tmp_path, text, complaint):
    path = write_manifest(tmp_path / "ds", text)
    with pytest.raises(DatasetError) as err:
        read_manifest(path)
    assert complaint in str(err.value)
    assert str(path) in str(err.value)
