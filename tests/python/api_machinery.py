"""The official Kubernetes Python client (`pip install kubernetes`) against a skiff server:
a paginated list with `limit`/`_continue`, a watch, and the dynamic client on one kind.

Usage: python3 api_machinery.py KUBECONFIG NAMESPACE. Prints `ok` and exits 0 when every
check holds; an assertion error (exit 1) names the first that does not.
"""

import sys
import threading

from kubernetes import client, config, dynamic, watch


def main(kubeconfig, ns):
    api_client = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api_client)

    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    names = ["py-%02d" % i for i in range(7)]
    for n in names:
        core.create_namespaced_config_map(
            ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=n, labels={"set": "py"}), data={"n": n})
        )

    # Pages of 3 through one snapshot: an object made between pages is not in this list.
    seen, token, pages = [], None, 0
    while True:
        page = core.list_namespaced_config_map(ns, label_selector="set=py", limit=3, _continue=token)
        pages += 1
        seen += [c.metadata.name for c in page.items]
        assert len(page.items) <= 3, page.metadata
        if pages == 1:
            core.create_namespaced_config_map(
                ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="py-late", labels={"set": "py"}))
            )
        token = page.metadata._continue
        if not token:
            break
    assert seen == names, seen
    assert pages == 3, pages

    # Unfiltered, the first page says how many remain.
    first = core.list_namespaced_config_map(ns, limit=2)
    total = len(core.list_namespaced_config_map(ns).items)
    assert first.metadata.remaining_item_count == total - 2, (first.metadata, total)

    # A watch sees an object made after it started.
    w = watch.Watch()
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    made = threading.Event()

    def make():
        made.wait(10)
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="py-watched")))

    threading.Thread(target=make, daemon=True).start()
    got = None
    for ev in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=20):
        made.set()
        if ev["type"] == "ADDED" and ev["object"].metadata.name == "py-watched":
            got = ev
            w.stop()
    assert got is not None, "the watch saw no ADDED py-watched"

    # The dynamic client: discovery, then create, get, list and delete of a Deployment.
    dyn = dynamic.DynamicClient(api_client)
    deployments = dyn.resources.get(api_version="apps/v1", kind="Deployment")
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "py-dyn"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "py-dyn"}},
            "template": {
                "metadata": {"labels": {"app": "py-dyn"}},
                "spec": {"containers": [{"name": "c", "image": "example.com/none:v1"}]},
            },
        },
    }
    deployments.create(body=body, namespace=ns)
    d = deployments.get(name="py-dyn", namespace=ns)
    assert d.spec.replicas == 0, d
    listed = deployments.get(namespace=ns)
    assert [i.metadata.name for i in listed.items] == ["py-dyn"], listed
    deployments.delete(name="py-dyn", namespace=ns)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
