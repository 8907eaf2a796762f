"""Who may use which URL: every route Django resolves, for every kind of caller.

The route table below must name every URL pattern the resolver knows (`test_every_route_is_classified`),
so a route added later fails the suite until someone decides who may use it. Each route is then
requested as: anonymous, another user, the owner (session and API token), staff, the owner's board
token, another user's board token, and a revoked board token - GET always, POST where the route takes
it, POST/DELETE on every API route - with real rows behind every id. A refused request must change
nothing (row counts and statuses are compared), no answer may be a 5xx, and the owner's names and
ids must not show up in what others get. Session POSTs carry a CSRF token; a separate test checks
that a session POST without one is refused and writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.crypto import get_random_string
from rest_framework.authtoken.models import Token

from devices import services as device_services
from devices.models import Device, LatencyTableRecord, ModelMeasurement, ProfilingJob
from nasweb.core.models import JobStatus, WorkerReport
from nasweb.runs.models import AdaptedModel, AdaptionRun, MetaTrainingRun, Method, SupportSet
from tests.conftest import tiny_space

pytestmark = pytest.mark.django_db

#: In every name the owner gives an object; nobody but the owner and staff may ever see it.
MARKER = "Zq7OwnerOnly"
LOGIN = settings.LOGIN_URL
ADMIN_LOGIN = "/admin/login/"

ANON, OTHER, OWNER, OWNER_TOKEN, STAFF = "anonymous", "other-user", "owner", "owner-api-token", "staff"
DEVICE, FOREIGN_DEVICE, REVOKED = "owner-board-token", "other-board-token", "revoked-board-token"
PRINCIPALS = [ANON, OTHER, OWNER, OWNER_TOKEN, STAFF, DEVICE, FOREIGN_DEVICE, REVOKED]
#: Callers a user page treats as nobody (board tokens and API tokens are not browser sessions).
NOT_LOGGED_IN = {ANON, DEVICE, FOREIGN_DEVICE, REVOKED}


# --- the world every route is requested against ----------------------------------------------


@dataclass
class World:
    users: dict
    board: Device
    other_board: Device
    job: ProfilingJob
    cpu: Device
    supernet: MetaTrainingRun
    training: MetaTrainingRun  # queued: cancellable
    adaption: AdaptionRun
    queued_adaption: AdaptionRun
    model: AdaptedModel
    support: SupportSet
    table: LatencyTableRecord
    tokens: dict = field(default_factory=dict)
    admin_objects: dict = field(default_factory=dict)


def _lut_record(device: Device, job: ProfilingJob) -> LatencyTableRecord:
    from engine.latency.lut import LatencyTable

    entries = {layer["key"]: 0.1 for layer in job.layers}
    table = LatencyTable(device=device.name, entries=entries, overhead_ms=0.02, metadata={})
    return LatencyTableRecord.objects.create(
        device=device, space=job.space, space_key=job.space_key, table=table.to_dict(),
        entries_count=len(entries), accuracy={"n": 0, "samples": []},
    )  # fmt: skip


@pytest.fixture
def world(tmp_path) -> World:
    from django_celery_results.models import GroupResult, TaskResult

    model = get_user_model()
    users = {
        OWNER: model.objects.create_user("owner", password="pw-owner-123"),
        OTHER: model.objects.create_user("other", password="pw-other-123"),
        STAFF: model.objects.create_user("staff", password="pw-staff-123", is_staff=True, is_superuser=True),
    }
    owner, other = users[OWNER], users[OTHER]
    device_services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")

    registration = device_services.board_register(owner=owner, name=f"board {MARKER}")
    revoked_token = registration.token
    # Rotating revokes the first token while the board stays usable with the new one.
    rotated = device_services.board_token_rotate(device=registration.device)
    board = registration.device
    job = device_services.profiling_start(
        device=board, owner=owner, space=tiny_space(), repeats=3, warmup=1, overhead_subnets=1
    )
    model_file = tmp_path / "model-0.pt"
    model_file.write_bytes(b"torchscript model to time")
    ModelMeasurement.objects.create(
        job=job, index=0, purpose="fit", arch={}, input_shape=[1, 1, 28, 28], file=str(model_file)
    )
    table = _lut_record(board, job)

    foreign = device_services.board_register(owner=other, name="board of the other user")
    device_services.profiling_start(
        device=foreign.device, owner=other, space=tiny_space(), overhead_subnets=0
    )

    space = {"num_classes": 5, "in_channels": 1, "image_size": 28}
    supernet = MetaTrainingRun.objects.create(
        owner=owner, name=f"supernet {MARKER}", method=Method.HMETANAS, ways=5, spec={},
        status=JobStatus.SUCCEEDED, space=space, summary={},
    )  # fmt: skip
    training = MetaTrainingRun.objects.create(owner=owner, name=f"training {MARKER}", spec={})
    MetaTrainingRun.objects.create(owner=other, name="training of the other user", spec={})
    adaption = AdaptionRun.objects.create(
        owner=owner, name=f"adaption {MARKER}", supernet=supernet, device=cpu, constraint="params",
        budgets=[3000.0], status=JobStatus.SUCCEEDED, result={"front": [], "baselines": [], "outcomes": []},
    )  # fmt: skip
    queued_adaption = AdaptionRun.objects.create(
        owner=owner, name=f"queued {MARKER}", supernet=supernet, device=cpu, constraint="params",
        budgets=[3000.0],
    )  # fmt: skip
    torchscript = tmp_path / "model.pt"
    torchscript.write_bytes(b"torchscript-bytes")
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"params": 2000}))
    adapted = AdaptedModel.objects.create(
        run=adaption, budget=3000, arch={}, card={"params": 2000, "arch_code": "d1"},
        torchscript=str(torchscript), card_path=str(card),
    )  # fmt: skip
    support = SupportSet.objects.create(
        owner=owner, name=f"support {MARKER}", path=str(tmp_path / "support.zip"), class_names=["a", "b"],
        images_per_class=[1, 1],
    )  # fmt: skip

    tokens = {
        OWNER_TOKEN: Token.objects.create(user=owner).key,
        DEVICE: rotated.token,
        FOREIGN_DEVICE: foreign.token,
        REVOKED: revoked_token,
    }
    admin_objects = {
        "auth_group": Group.objects.create(name="group").pk,
        "auth_user": owner.pk,
        "django_celery_results_taskresult": TaskResult.objects.create(task_id="t-1").pk,
        "django_celery_results_groupresult": GroupResult.objects.create(group_id="g-1").pk,
        "authtoken_tokenproxy": owner.pk,  # TokenProxy's pk is its user's
        "core_workerreport": WorkerReport.objects.create(owner=owner).pk,
        "devices_device": board.pk,
        "devices_profilingjob": job.pk,
        "devices_latencytablerecord": table.pk,
        "runs_metatrainingrun": supernet.pk,
        "runs_adaptionrun": adaption.pk,
        "runs_adaptedmodel": adapted.pk,
        "runs_supportset": support.pk,
    }
    return World(
        users=users, board=board, other_board=foreign.device, job=job, cpu=cpu, supernet=supernet,
        training=training, adaption=adaption, queued_adaption=queued_adaption, model=adapted,
        support=support, table=table, tokens=tokens, admin_objects=admin_objects,
    )  # fmt: skip


# --- the route table -----------------------------------------------------------------------

PUBLIC, PAGE, API, AGENT, ADMIN = "public", "page", "api", "agent", "admin"


@dataclass(frozen=True)
class Route:
    """How one URL pattern is reached and who may use it.

    kind: public (anyone), page (login required, HTML/JSON for browsers), api (DRF, session or
    token), agent (board device tokens only), admin (staff only).
    private: the URL names one of the owner's objects, so another user gets 403/404.
    get / post: the statuses the owner (and staff, unless *_staff says otherwise) should get;
    None when the method is not offered (then the caller who gets that far gets 405).
    """

    kind: str
    url: Callable[[World], str]
    private: bool = False
    get: frozenset | None = frozenset({200})
    post: frozenset | None = None
    post_body: Callable[[World], dict] | None = None
    get_staff: frozenset | None = None
    post_staff: frozenset | None = None
    #: Board-token routes: what the owner's board and another user's board get.
    device_get: frozenset = frozenset()
    device_post: frozenset = frozenset()
    foreign: frozenset = frozenset({404})
    #: Public routes: what a POST gets (GET answers every caller the same way).
    public_post: frozenset | None = None
    #: What another user's POST gets when it names the owner's objects in its body.
    post_other: frozenset | None = None
    #: Admin pages: where non-staff callers are sent.
    refused_redirect: str = ADMIN_LOGIN


def S(*codes: int) -> frozenset:
    return frozenset(codes)


def _job_url(suffix: str) -> Callable[[World], str]:
    return lambda w: f"/api/agent/jobs/{w.job.pk}/{suffix}"


def _results_body(w: World) -> dict:
    import uuid

    return {"batch_id": str(uuid.uuid4()), "results": [{"key": w.job.layers[0]["key"], "ms": 0.5}]}


ROUTES: dict[str, Route] = {
    # --- site
    "healthz": Route(PUBLIC, lambda w: "/healthz", get=S(200, 503)),
    "home": Route(PAGE, lambda w: "/"),
    "login": Route(
        PUBLIC,
        lambda w: LOGIN,
        public_post=S(200),
        post_body=lambda w: {"username": "owner", "password": "not the password"},
    ),  # fmt: skip
    "logout": Route(PUBLIC, lambda w: "/accounts/logout/", get=S(405), public_post=S(302)),
    "api-schema": Route(PUBLIC, lambda w: "/api/schema/"),
    "api-docs": Route(PUBLIC, lambda w: "/api/docs/"),
    # --- devices (pages)
    "devices:list": Route(PAGE, lambda w: "/devices/"),
    "devices:register": Route(
        PAGE,
        lambda w: "/devices/register/",
        post=S(200),
        post_body=lambda w: {"name": "new board", "description": "", "preset": "tiny"},
    ),  # fmt: skip
    "devices:detail": Route(PAGE, lambda w: f"/devices/{w.board.pk}/", private=True),
    "devices:profile": Route(
        PAGE,
        lambda w: f"/devices/{w.board.pk}/profile/",
        private=True,
        get=None,
        post=S(302),
        post_body=lambda w: {"repeats": 3, "warmup": 1, "accuracy_subnets": 0},
    ),  # fmt: skip
    "devices:table-json": Route(PAGE, lambda w: f"/devices/{w.board.pk}/table.json", private=True),
    "devices:profiling-json": Route(PAGE, lambda w: f"/profiling/{w.job.pk}.json", private=True),
    # --- devices (API)
    "devices:api-device-list": Route(
        API, lambda w: "/api/devices/", post=S(201), post_body=lambda w: {"name": "api board"}
    ),
    "devices:api-device-detail": Route(API, lambda w: f"/api/devices/{w.board.pk}/", private=True),
    "devices:api-device-profile": Route(
        API,
        lambda w: f"/api/devices/{w.board.pk}/profile/",
        private=True,
        get=None,
        post=S(201),
        post_body=lambda w: {"repeats": 3, "warmup": 1},
    ),  # fmt: skip
    "devices:api-device-revoke": Route(
        API, lambda w: f"/api/devices/{w.board.pk}/revoke/", private=True, get=None, post=S(200)
    ),
    "devices:api-device-rotate-token": Route(
        API, lambda w: f"/api/devices/{w.board.pk}/rotate-token/", private=True, get=None, post=S(200)
    ),
    "devices:api-device-table": Route(API, lambda w: f"/api/devices/{w.board.pk}/table/", private=True),
    "devices:api-profiling-detail": Route(API, lambda w: f"/api/profiling/{w.job.pk}/", private=True),
    "devices:api-profiling-cancel": Route(
        API, lambda w: f"/api/profiling/{w.job.pk}/cancel/", private=True, get=None, post=S(200)
    ),
    # --- the board agent protocol
    "devices:agent-job": Route(AGENT, lambda w: "/api/agent/job", device_get=S(200), foreign=S(200, 204)),
    "devices:agent-results": Route(AGENT, _job_url("results"), device_post=S(200), post_body=_results_body),
    "devices:agent-model-file": Route(AGENT, _job_url("models/0/file"), device_get=S(200)),
    "devices:agent-reference": Route(
        AGENT, _job_url("reference"), device_post=S(200), post_body=lambda w: {"reference_ms": 0.1}
    ),
    "devices:agent-model-result": Route(
        AGENT, _job_url("models/0/result"), device_post=S(200), post_body=lambda w: {"ms": 1.5}
    ),
    # Incomplete (no layer posted yet): the board is heard, the job is not done.
    "devices:agent-complete": Route(
        AGENT, _job_url("complete"), device_post=S(409), post_body=lambda w: {"call_overhead_ms": 0.01}
    ),
    "devices:agent-download": Route(PUBLIC, lambda w: "/agent/nasweb_agent.py"),
    # --- runs (pages)
    "runs:metatrain-list": Route(
        PAGE,
        lambda w: "/runs/train/",
        post=S(302),
        post_body=lambda w: {
            "name": "x",
            "method": "hmetanas",
            "dataset": "omniglot",
            "ways": 5,
            "shots": 1,
            "backbone": "vgg9",
            "preset": "tiny",
        },
    ),  # fmt: skip
    "runs:metatrain-detail": Route(PAGE, lambda w: f"/runs/train/{w.supernet.pk}/", private=True),
    "runs:metatrain-json": Route(PAGE, lambda w: f"/runs/train/{w.supernet.pk}.json", private=True),
    "runs:metatrain-profile-device": Route(
        PAGE,
        lambda w: f"/runs/train/{w.supernet.pk}/profile/",
        private=True,
        get=None,
        post=S(302),
        post_body=lambda w: {"device": w.board.pk},
    ),  # fmt: skip
    # Another user cannot pick the owner's super-net: the form refuses the choice (400).
    "runs:adaption-list": Route(
        PAGE,
        lambda w: "/runs/adapt/",
        post=S(302),
        post_other=S(400),
        post_body=lambda w: {
            "supernet": w.supernet.pk,
            "device": w.cpu.pk,
            "constraint": "params",
            "budgets": "3000",
            "preset": "tiny",
        },
    ),  # fmt: skip
    "runs:adaption-detail": Route(PAGE, lambda w: f"/runs/adapt/{w.adaption.pk}/", private=True),
    "runs:adaption-json": Route(PAGE, lambda w: f"/runs/adapt/{w.adaption.pk}.json", private=True),
    "runs:cancel": Route(
        PAGE, lambda w: f"/runs/adaption/{w.queued_adaption.pk}/cancel/", private=True, get=None, post=S(302)
    ),
    "runs:compare": Route(PAGE, lambda w: f"/runs/compare/?supernet={w.supernet.pk}"),
    "runs:compare-json": Route(PAGE, lambda w: f"/runs/compare/{w.supernet.pk}.json", private=True),
    "runs:model-download": Route(PAGE, lambda w: f"/models/{w.model.pk}/torchscript", private=True),
    # --- runs (API)
    "runs:api-metatrain-list": Route(
        API, lambda w: "/api/runs/train/", post=S(201), post_body=lambda w: {"method": "hmetanas"}
    ),
    "runs:api-metatrain-detail": Route(API, lambda w: f"/api/runs/train/{w.supernet.pk}/", private=True),
    "runs:api-adaption-list": Route(
        API,
        lambda w: "/api/runs/adapt/",
        post=S(201),
        post_other=S(404),
        post_body=lambda w: {
            "supernet": w.supernet.pk,
            "device": w.cpu.pk,
            "constraint": "params",
            "budgets": [3000],
        },
    ),  # fmt: skip
    "runs:api-adaption-detail": Route(API, lambda w: f"/api/runs/adapt/{w.adaption.pk}/", private=True),
    "runs:api-run-cancel": Route(
        API, lambda w: f"/api/runs/train/{w.training.pk}/cancel/", private=True, get=None, post=S(200)
    ),
    "runs:api-model-list": Route(API, lambda w: "/api/models/"),
    "runs:api-model-detail": Route(API, lambda w: f"/api/models/{w.model.pk}/", private=True),
    "runs:api-model-file": Route(API, lambda w: f"/api/models/{w.model.pk}/torchscript", private=True),
}

#: Which list answers must not contain which of the owner's objects (by id) for another user.
LIST_IDS: dict[str, Callable[[World], set[int]]] = {
    "devices:api-device-list": lambda w: {w.board.pk},
    "runs:api-metatrain-list": lambda w: {w.supernet.pk, w.training.pk},
    "runs:api-adaption-list": lambda w: {w.adaption.pk, w.queued_adaption.pk},
    "runs:api-model-list": lambda w: {w.model.pk},
}

# --- the admin: every model's standard pages, staff only ----------------------------------

ADMIN_MODELS = [
    "auth_group", "auth_user", "django_celery_results_taskresult", "django_celery_results_groupresult",
    "authtoken_tokenproxy", "core_workerreport", "devices_device", "devices_profilingjob",
    "devices_latencytablerecord", "runs_metatrainingrun", "runs_adaptionrun", "runs_adaptedmodel",
    "runs_supportset",
]  # fmt: skip
#: Admin pages that redirect (the bare object URL to its change page, view-on-site to the object).
ADMIN_REDIRECTS = S(301, 302)


def _admin_model_path(key: str) -> str:
    app, _, model = key.rpartition("_")
    return f"/admin/{app}/{model}/"


def _admin_routes() -> dict[str, Route]:
    routes = {
        "admin:index": Route(ADMIN, lambda w: "/admin/"),
        # A signed-in staff member is sent on to the index; everyone else sees the form.
        "admin:login": Route(PUBLIC, lambda w: ADMIN_LOGIN, get=S(200, 302)),
        # Logging out takes a POST (GET: 405); non-staff are sent to the index, which wants a login.
        "admin:logout": Route(
            ADMIN, lambda w: "/admin/logout/", get=S(405), post=S(200, 302), refused_redirect="/admin/"
        ),
        "admin:password_change": Route(ADMIN, lambda w: "/admin/password_change/"),
        "admin:password_change_done": Route(ADMIN, lambda w: "/admin/password_change/done/"),
        # Without its query (which model, which field) the autocomplete refuses even staff.
        "admin:autocomplete": Route(ADMIN, lambda w: "/admin/autocomplete/", get=S(403)),
        "admin:jsi18n": Route(ADMIN, lambda w: "/admin/jsi18n/"),
        "admin:view_on_site": Route(
            ADMIN, lambda w: f"/admin/r/{_content_type_id(ProfilingJob)}/{w.job.pk}/", get=ADMIN_REDIRECTS
        ),
        "admin:app_list": Route(ADMIN, lambda w: "/admin/devices/"),
        # Unknown admin URLs: anonymous users go to the login, staff get a 404.
        "admin/(?P<url>.*)$": Route(ADMIN, lambda w: "/admin/devices/no-such-model/", get=S(404)),
        "admin:auth_user_password_change": Route(
            ADMIN, lambda w: f"/admin/auth/user/{w.users[OWNER].pk}/password/"
        ),
    }
    for key in ADMIN_MODELS:
        base = _admin_model_path(key)

        def obj(w, key=key):
            return w.admin_objects[key]

        routes[f"admin:{key}_changelist"] = Route(ADMIN, lambda w, base=base: base)
        routes[f"admin:{key}_add"] = Route(ADMIN, lambda w, base=base: f"{base}add/")
        for action in ("history", "delete", "change"):
            routes[f"admin:{key}_{action}"] = Route(
                ADMIN, lambda w, base=base, action=action, obj=obj: f"{base}{obj(w)}/{action}/"
            )
        routes[f"{base[1:]}<path:object_id>/"] = Route(
            ADMIN, lambda w, base=base, obj=obj: f"{base}{obj(w)}/", get=ADMIN_REDIRECTS
        )
    return routes


def _content_type_id(model) -> int:
    from django.contrib.contenttypes.models import ContentType

    return ContentType.objects.get_for_model(model).pk


ROUTES.update(_admin_routes())


def _resolved_route_keys() -> set[str]:
    """Every URL pattern: its namespaced name, or its full pattern when it has no name."""

    def walk(patterns, prefix: str, namespace: str | None):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                inner = pattern.namespace
                joined = f"{namespace}:{inner}" if namespace and inner else (inner or namespace)
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern), joined)
            else:
                assert isinstance(pattern, URLPattern)
                if pattern.name:
                    yield f"{namespace}:{pattern.name}" if namespace else pattern.name
                else:
                    yield prefix + str(pattern.pattern)

    return set(walk(get_resolver().url_patterns, "", None))


def test_every_route_is_classified():
    resolved = _resolved_route_keys()
    assert len(resolved) == len(ROUTES)
    assert set(ROUTES) - resolved == set(), "classified routes that no longer exist"
    assert resolved - set(ROUTES) == set(), "new routes: add them to ROUTES with who may use them"


# --- expectations ----------------------------------------------------------------------------

REFUSED_API = S(401, 403)
NOT_ALLOWED = S(405)
OTHERS_OBJECT = S(403, 404)
SESSIONS = {ANON, OTHER, OWNER, STAFF}  # browsers: they hold (or could hold) a CSRF cookie


def expected(route: Route, principal: str, method: str) -> tuple[frozenset, str | None]:
    """(allowed statuses, the redirect target they must have when 302) for one caller and method."""
    if method != "GET" and principal not in SESSIONS and route.kind in (PUBLIC, PAGE, ADMIN):
        return S(403), None  # a form POST without a browser session's CSRF token
    if route.kind == PUBLIC:
        if method == "GET":
            return route.get, None
        return (route.public_post or NOT_ALLOWED), None
    if route.kind == ADMIN:
        if principal != STAFF:
            return S(302), route.refused_redirect
        return (route.get if method == "GET" else route.post), None
    if route.kind == AGENT:
        supported = {"GET": route.device_get, "POST": route.device_post}.get(method)
        if principal == DEVICE:
            return (supported or NOT_ALLOWED), None
        if principal == FOREIGN_DEVICE:
            return (route.foreign if supported else NOT_ALLOWED), None
        return REFUSED_API, None
    if route.kind == PAGE and principal not in (OTHER, OWNER, STAFF):
        return S(302), LOGIN
    if route.kind == API and principal in NOT_LOGGED_IN:
        return REFUSED_API, None
    offered = route.get if method == "GET" else route.post if method == "POST" else None
    if offered is None:
        return NOT_ALLOWED, None
    if principal == OTHER:
        if route.private:
            return OTHERS_OBJECT, None
        if method == "POST" and route.post_other is not None:
            return route.post_other, None
    if principal == STAFF:
        return ((route.get_staff if method == "GET" else route.post_staff) or offered), None
    return offered, None


def methods_of(route: Route) -> list[str]:
    if route.kind in (API, AGENT):
        return ["GET", "POST", "DELETE"]  # unsupported ones must answer 405 (or refuse), never 2xx/5xx
    if route.post is not None or route.public_post is not None:
        return ["GET", "POST"]
    return ["GET"]


# --- requests --------------------------------------------------------------------------------


@dataclass
class Caller:
    client: Client
    csrf: str | None


def callers(world: World) -> dict[str, Caller]:
    result = {}
    for principal in PRINCIPALS:
        headers = {}
        if principal == OWNER_TOKEN:
            headers["Authorization"] = f"Token {world.tokens[OWNER_TOKEN]}"
        elif principal in (DEVICE, FOREIGN_DEVICE, REVOKED):
            headers["Authorization"] = f"Device {world.tokens[principal]}"
        client = Client(enforce_csrf_checks=True, headers=headers)
        if principal in (OTHER, OWNER, STAFF):
            client.force_login(world.users[principal])
        csrf = None
        if principal in SESSIONS:
            csrf = get_random_string(32)
            client.cookies[settings.CSRF_COOKIE_NAME] = csrf
        result[principal] = Caller(client, csrf)
    return result


def send(caller: Caller, route: Route, world: World, method: str, *, with_csrf: bool = True):
    url = route.url(world)
    headers = {"X-CSRFToken": caller.csrf} if caller.csrf and with_csrf else {}
    if method == "GET":
        return caller.client.get(url, headers=headers)
    if method == "DELETE":
        return caller.client.delete(url, headers=headers)
    body = route.post_body(world) if route.post_body else {}
    if route.kind in (API, AGENT):
        return caller.client.post(url, json.dumps(body), content_type="application/json", headers=headers)
    return caller.client.post(url, body, headers=headers)


def fingerprint() -> dict:
    """Row counts of every model (sessions aside) and the state a request could flip."""
    from django.apps import apps

    from devices.models import DeviceToken, LayerTiming

    state = {
        model._meta.label: model.objects.count()
        for model in apps.get_models()
        if model._meta.label != "sessions.Session"
    }
    state["device status"] = sorted(Device.objects.values_list("pk", "status"))
    state["revoked tokens"] = sorted(DeviceToken.objects.values_list("pk", "revoked_at"))
    state["timings"] = sorted(LayerTiming.objects.values_list("key", "ms"))
    state["models measured"] = sorted(ModelMeasurement.objects.values_list("pk", "measured_ms"))
    for model in (ProfilingJob, MetaTrainingRun, AdaptionRun):
        state[model.__name__] = sorted(model.objects.values_list("pk", "status", "cancel_requested"))
    return state


def body_text(response) -> str:
    if getattr(response, "streaming", False):
        return ""  # file downloads: checked by status alone
    return response.content.decode(errors="replace")


def check(route_key: str, route: Route, world: World, principal: str, method: str, response) -> list[str]:
    problems = []
    allowed, redirect = expected(route, principal, method)
    where = f"{method} {route.url(world)} as {principal} ({route_key})"
    status = response.status_code
    if status >= 500 and status not in allowed:
        problems.append(f"{where}: server error {status}")
    elif status not in allowed:
        problems.append(f"{where}: got {status}, expected one of {sorted(allowed)}")
    elif status == 302 and redirect is not None and not response["Location"].startswith(redirect):
        problems.append(f"{where}: redirected to {response['Location']}, expected {redirect}")
    if principal not in (OWNER, OWNER_TOKEN, STAFF) and MARKER in body_text(response):
        problems.append(f"{where}: the answer shows the owner's objects")
    if principal == OTHER and method == "GET" and route_key in LIST_IDS and status == 200:
        leaked = {item["id"] for item in response.json()} & LIST_IDS[route_key](world)
        if leaked:
            problems.append(f"{where}: the list shows the owner's ids {sorted(leaked)}")
    return problems


REFUSALS = S(400, 401, 403, 404, 405, 409)


def is_refusal(route: Route, principal: str, method: str) -> bool:
    allowed, redirect = expected(route, principal, method)
    return redirect is not None or allowed <= REFUSALS


@pytest.mark.parametrize("route_key", sorted(ROUTES))
def test_each_caller_gets_what_it_may_and_no_more(world, route_key):
    route = ROUTES[route_key]
    everyone = callers(world)
    problems = []
    for principal in PRINCIPALS:
        for method in methods_of(route):
            before = fingerprint()
            savepoint = transaction.savepoint()  # every request starts from the same world
            try:
                response = send(everyone[principal], route, world, method)
                problems += check(route_key, route, world, principal, method, response)
                if is_refusal(route, principal, method) and fingerprint() != before:
                    problems.append(f"{method} {route_key} as {principal}: refused, yet it changed rows")
            finally:
                transaction.savepoint_rollback(savepoint)
    assert not problems, "\n".join(problems)


POST_ROUTES = sorted(
    key for key, route in ROUTES.items() if route.post is not None or route.public_post is not None
)


@pytest.mark.parametrize("route_key", POST_ROUTES)
def test_a_session_post_without_its_csrf_token_is_refused(world, route_key):
    route = ROUTES[route_key]
    principal = ANON if route.kind == PUBLIC else OWNER
    caller = callers(world)[principal]
    before = fingerprint()
    response = send(caller, route, world, "POST", with_csrf=False)
    assert response.status_code == 403, (route_key, response.status_code)
    assert fingerprint() == before
    # The same request with the token goes through (the refusal above was the missing token).
    response = send(caller, route, world, "POST")
    assert response.status_code in expected(route, principal, "POST")[0]
