"""Hostile support-set uploads over HTTP, through the adaption form and the API.

Each upload must be refused with a 4xx whose message says what was wrong, create no row, and leave
the media and artifact folders exactly as they were (nothing written anywhere, nothing left behind).
A well-formed zip goes through the same path and is kept, so the checks can see a write.
"""

from __future__ import annotations

import html
import io
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from PIL import Image
from rest_framework.authtoken.models import Token

from devices import services as device_services
from devices.models import Device
from nasweb.core.models import JobStatus
from nasweb.runs.models import AdaptionRun, MetaTrainingRun, Method, SupportSet

pytestmark = pytest.mark.django_db
WAYS = 5


@pytest.fixture(autouse=True)
def own_folders(tmp_path):
    """Fresh media and artifact folders: ids restart in every test database, file names would not."""
    with override_settings(MEDIA_ROOT=tmp_path / "media", NASWEB_ARTIFACT_DIR=tmp_path / "artifacts"):
        yield


@pytest.fixture
def owner():
    return get_user_model().objects.create_user("uploader", password="pw-uploader-1")


@pytest.fixture
def form_fields(owner):
    device_services.seed_builtin_devices()
    supernet = MetaTrainingRun.objects.create(
        owner=owner, method=Method.HMETANAS, ways=WAYS, spec={}, status=JobStatus.SUCCEEDED,
        space={"num_classes": WAYS, "in_channels": 1, "image_size": 28},
    )  # fmt: skip
    cpu = Device.objects.get(builtin_key="local-cpu")
    return {"supernet": supernet.pk, "device": cpu.pk, "constraint": "params", "preset": "tiny"}


def png(size=(28, 28), shade=90) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, color=shade).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of width x height: a few tens of kB on disk, width*height pixels when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressed = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")


def class_zip(extra=None, classes: int = WAYS, images: int = 1) -> bytes:
    """A valid zip of `classes` folders, plus whatever `extra(archive)` adds."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        tiny = png()
        for c in range(classes):
            for i in range(images):
                archive.writestr(f"class_{c}/img_{i}.png", tiny)
        if extra is not None:
            extra(archive)
    return buffer.getvalue()


def _symlink(archive: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo("class_0/link.png")
    info.create_system = 3  # unix: the mode bits below are read
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive.writestr(info, "/etc/passwd")


def _bomb(archive: zipfile.ZipFile) -> None:
    """1 GiB of zeros in one member; deflate keeps it near 1 MB, written in 1 MiB steps."""
    info = zipfile.ZipInfo("class_0/bomb.png")
    info.compress_type = zipfile.ZIP_DEFLATED
    zeros = bytes(1 << 20)
    with archive.open(info, "w", force_zip64=True) as member:
        for _ in range(1024):
            member.write(zeros)


HOSTILE = {
    "zip-slip": (lambda: class_zip(lambda a: a.writestr("../../escaped.png", png())), "contains '..'"),
    "zip-slip-in-class": (
        lambda: class_zip(lambda a: a.writestr("class_0/../../../escaped.png", png())),
        "contains '..'",
    ),
    "absolute-path": (lambda: class_zip(lambda a: a.writestr("/tmp/escaped.png", png())), "absolute path"),
    "windows-path": (lambda: class_zip(lambda a: a.writestr("C:/escaped.png", png())), "absolute path"),
    "symlink": (lambda: class_zip(_symlink), "symbolic link"),
    "zip-bomb": (lambda: class_zip(_bomb), "uncompressed size exceeds the limit"),
    "text-renamed-png": (
        lambda: class_zip(lambda a: a.writestr("class_0/notes.png", b"these are not pixels" * 50)),
        "not a readable image",
    ),
    "zero-bytes": (lambda: class_zip(lambda a: a.writestr("class_0/empty.png", b"")), "empty (0 bytes)"),
    "ten-thousand-classes": (lambda: class_zip(classes=10_000), "exceed the limit"),
    "wrong-class-count": (lambda: class_zip(classes=WAYS + 2), "has 7 classes but the super-net is 5-way"),
    "huge-image": (
        lambda: class_zip(lambda a: a.writestr("class_0/huge.png", huge_png(20_000, 20_000))),
        "image too large to decode safely",
    ),
    # Under PIL's own bomb threshold, over ours: refused from the header, never decoded.
    "large-image": (
        lambda: class_zip(lambda a: a.writestr("class_0/large.png", huge_png(7_000, 7_000))),
        "49,000,000 pixels exceeds the limit",
    ),
    "png-posing-as-zip": (lambda: png(), "not a zip file"),
    "truncated-zip": (lambda: class_zip()[:-40], "not a zip file"),
}


def tree(*roots: Path) -> dict[str, int]:
    """Every file under the roots with its size."""
    return {
        str(path): path.stat().st_size for root in roots for path in Path(root).rglob("*") if path.is_file()
    }


def watched_tree() -> dict[str, int]:
    return tree(settings.MEDIA_ROOT, settings.NASWEB_ARTIFACT_DIR)


def rows() -> tuple[int, int]:
    return SupportSet.objects.count(), AdaptionRun.objects.count()


def post_form(client, form_fields, payload: bytes, name="support.zip", content_type="application/zip"):
    upload = SimpleUploadedFile(name, payload, content_type=content_type)
    return client.post("/runs/adapt/", {**form_fields, "budgets": "3000", "support_zip": upload})


def post_api(owner, form_fields, payload: bytes, name="support.zip", content_type="application/zip"):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=owner)[0].key}")
    upload = SimpleUploadedFile(name, payload, content_type=content_type)
    return client.post(
        "/api/runs/adapt/", {**form_fields, "budgets": [3000], "support_zip": upload}, format="multipart"
    )


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_zip_is_refused_with_a_message_and_leaves_nothing(client, owner, form_fields, case):
    build, message = HOSTILE[case]
    payload = build()
    assert len(payload) < 4 * 1024 * 1024, "the hostile uploads themselves stay small"
    client.force_login(owner)
    before_tree, before_rows = watched_tree(), rows()

    page = post_form(client, form_fields, payload)
    assert page.status_code == 400, case
    assert message in html.unescape(page.content.decode()), page.content.decode()[-3000:]
    api = post_api(owner, form_fields, payload)
    assert api.status_code == 400, (case, api.content[:500])
    assert message in api.json()["error"]
    # Messages name the upload, never the server's temporary paths.
    assert str(settings.MEDIA_ROOT) not in api.json()["error"]

    assert rows() == before_rows
    assert watched_tree() == before_tree
    assert not Path("/tmp/escaped.png").exists()


def test_a_valid_zip_is_kept_under_its_owners_folder(client, owner, form_fields):
    """The positive control: the same path stores a good upload (so the checks above can see writes)."""
    client.force_login(owner)
    before = watched_tree()
    response = post_form(client, form_fields, class_zip(images=2))
    assert response.status_code == 302, response.content.decode()[-2000:]
    support = SupportSet.objects.get()
    assert support.class_names == [f"class_{c}" for c in range(WAYS)] and support.images_per_class == [2] * 5
    added = set(watched_tree()) - set(before)
    assert added == {support.path}
    assert Path(support.path).parent == Path(settings.MEDIA_ROOT) / "support" / str(owner.pk)


def test_an_adaption_refused_after_a_good_upload_keeps_neither(owner, form_fields):
    """The zip passes every check but the run is refused (its super-net failed): no support set
    row may outlive the refusal, and neither may its file."""
    MetaTrainingRun.objects.filter(pk=form_fields["supernet"]).update(status=JobStatus.FAILED)
    before_tree, before_rows = watched_tree(), rows()
    response = post_api(owner, form_fields, class_zip())
    assert response.status_code == 400
    assert "choose a finished H-Meta-NAS super-net" in response.json()["error"]
    assert rows() == before_rows
    assert watched_tree() == before_tree


@override_settings(NASWEB_MAX_UPLOAD_BYTES=200_000)
def test_an_oversized_upload_is_refused_before_it_is_stored(client, owner, form_fields):
    client.force_login(owner)
    before_tree, before_rows = watched_tree(), rows()
    payload = class_zip() + bytes(400_000)
    page = post_form(client, form_fields, payload)
    assert page.status_code == 400
    assert "the limit is 200,000 bytes" in page.content.decode()
    api = post_api(owner, form_fields, payload)
    assert api.status_code == 400 and "the limit is 200,000 bytes" in api.json()["error"]
    # Just under the body limit but over the file limit: the service's own size check.
    payload = class_zip() + bytes(200_000 - len(class_zip()) + 1_000)
    api = post_api(owner, form_fields, payload)
    assert api.status_code == 400 and "larger than 200000 bytes" in api.json()["error"]
    assert rows() == before_rows and watched_tree() == before_tree


def test_an_oversized_json_body_is_refused_with_a_message(owner, form_fields):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=owner).key}")
    before = rows()
    body = '{"name": "' + "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + '"}'
    response = client.post("/api/runs/adapt/", body, content_type="application/json")
    assert response.status_code in (400, 413)
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in response.json()["error"]
    assert rows() == before


@pytest.mark.parametrize("content_type", ["application/xml", "text/plain", "image/png"])
def test_a_body_of_the_wrong_content_type_is_refused(owner, form_fields, content_type):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=owner).key}")
    before_tree, before_rows = watched_tree(), rows()
    response = client.post("/api/runs/adapt/", class_zip(), content_type=content_type)
    assert response.status_code == 415
    assert "Unsupported media type" in response.json()["detail"]
    assert rows() == before_rows and watched_tree() == before_tree


def test_the_form_refuses_a_json_body(client, owner, form_fields):
    client.force_login(owner)
    before = rows()
    response = client.post(
        "/runs/adapt/", {**form_fields, "budgets": "3000"}, content_type="application/json"
    )
    assert response.status_code == 400
    assert "This field is required" in response.content.decode()
    assert rows() == before
