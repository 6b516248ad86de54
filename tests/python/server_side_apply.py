"""Server-side apply through the official Kubernetes Python client (`pip install kubernetes`):
two field managers, a conflict on a field the other owns, `force` taking it, a shared field,
and an apply without a field manager refused.

Usage: python3 server_side_apply.py KUBECONFIG NAMESPACE. Prints `ok` and exits 0 when every
check holds; an assertion error (exit 1) names the first that does not.
"""

import json
import sys

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

APPLY = "application/apply-patch+yaml"


def deployment(**spec):
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "py-ssa"},
        "spec": spec,
    }
    return body


def main(kubeconfig, ns):
    api_client = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api_client)
    apps = client.AppsV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))

    full = deployment(
        replicas=0,
        selector={"matchLabels": {"app": "py-ssa"}},
        template={
            "metadata": {"labels": {"app": "py-ssa"}},
            "spec": {"containers": [{"name": "c", "image": "example.com/none:v1"}]},
        },
    )
    made = apps.patch_namespaced_deployment(
        "py-ssa", ns, full, field_manager="first", _content_type=APPLY
    )
    assert made.spec.replicas == 0, made.spec
    managers = {(m.manager, m.operation) for m in made.metadata.managed_fields}
    assert managers == {("first", "Apply")}, managers

    # Another manager changing a field `first` owns: 409 naming the field.
    try:
        apps.patch_namespaced_deployment(
            "py-ssa", ns, deployment(replicas=2), field_manager="second", _content_type=APPLY
        )
        raise AssertionError("a conflicting apply was accepted")
    except ApiException as e:
        assert e.status == 409, (e.status, e.body)
        status = json.loads(e.body)
        assert status["reason"] == "Conflict", status
        assert status["message"] == 'Apply failed with 1 conflict: conflict with "first": .spec.replicas', status
        causes = status["details"]["causes"]
        assert causes == [
            {"reason": "FieldManagerConflict", "message": 'conflict with "first"', "field": ".spec.replicas"}
        ], causes

    # The same value is shared, not a conflict.
    apps.patch_namespaced_deployment(
        "py-ssa", ns, deployment(replicas=0), field_manager="second", _content_type=APPLY
    )
    # Forced, the field changes hands.
    forced = apps.patch_namespaced_deployment(
        "py-ssa", ns, deployment(replicas=3), field_manager="second", force=True, _content_type=APPLY
    )
    assert forced.spec.replicas == 3, forced.spec
    owners = {}
    for m in forced.metadata.managed_fields:
        owners[m.manager] = json.dumps(m.fields_v1)
    assert '"f:replicas"' in owners["second"], owners
    assert '"f:replicas"' not in owners["first"], owners

    # An apply names its manager.
    try:
        apps.patch_namespaced_deployment("py-ssa", ns, deployment(replicas=1), _content_type=APPLY)
        raise AssertionError("an apply without a field manager was accepted")
    except ApiException as e:
        assert e.status == 422, (e.status, e.body)
        assert "fieldManager: Required value: is required for apply patch" in json.loads(e.body)["message"], e.body
    apps.delete_namespaced_deployment("py-ssa", ns)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
