"""``modulemesh hub publish|pull|list|verify|keygen``: share experts and meshes through any fsspec URL."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    pub = sub.add_parser(
        "publish", help="upload an expert (NAME.json) or a mesh directory as the next version of a name"
    )
    pub.add_argument("path", help="expert record (PATH, PATH.json or PATH.safetensors) or mesh directory")
    pub.add_argument("url", help="hub: a folder, file://, memory://, s3://, gs:// URL")
    pub.add_argument("--name", help="module name on the hub (default: the expert's name or the mesh directory's)")
    pub.add_argument("--sign", metavar="KEY", help="sign with this ed25519 private key (see `hub keygen`)")
    pull = sub.add_parser("pull", help="download NAME[@VERSION], checking every hash (and the signature)")
    pull.add_argument("spec", metavar="NAME[@VERSION]")
    pull.add_argument("url")
    pull.add_argument("--out", required=True, help="new directory to write the module into")
    _trust_args(pull)
    ls = sub.add_parser("list", help="modules and versions on a hub")
    ls.add_argument("url")
    ver = sub.add_parser(
        "verify", help="check a local expert or mesh (seals, hashes, weights; a pulled one also its signature)"
    )
    ver.add_argument("path")
    _trust_args(ver)
    key = sub.add_parser("keygen", help="create an ed25519 key pair KEY and KEY.pub")
    key.add_argument("path", metavar="KEY")
    key.add_argument("--comment", default="", help="label stored in KEY.pub")


def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trusted-keys", metavar="FILE", help="public keys you accept, one 'ed25519 <base64>' line each")
    p.add_argument("--require-signed", action="store_true", help="refuse modules not signed by a trusted key")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..hub import Hub, generate_key, load_trusted_keys, verify_local, verify_pulled

    console = Console(width=160)
    trusted = load_trusted_keys(args.trusted_keys) if getattr(args, "trusted_keys", None) else None
    if args.hub_command == "publish":
        entry = Hub(args.url).publish(args.path, name=args.name, key=args.sign)
        signed = "signed" if entry["signature"] else "unsigned"
        console.print(f"published {entry['name']}@{entry['version']} ({entry['kind']}, {signed}) to {args.url}")
    elif args.hub_command == "pull":
        path = Hub(args.url).pull(args.spec, args.out, trusted, args.require_signed)
        console.print(f"pulled {args.spec} from {args.url} into {path}")
    elif args.hub_command == "list":
        table = Table(title=f"modules on {args.url}")
        for col in ("name", "version", "kind", "signed", "descriptor"):
            table.add_column(col)
        for e in Hub(args.url).entries():
            table.add_row(
                str(e.get("name")),
                str(e.get("version")),
                str(e.get("kind")),
                "yes" if e.get("signature") else "no",
                str(e.get("descriptor"))[:16],
            )
        console.print(table)
    elif args.hub_command == "verify":
        pkg = verify_local(args.path)
        directory = Path(args.path) if Path(args.path).is_dir() else pkg.base
        if (directory / "hub-package.json").exists():
            verify_pulled(directory, trusted, args.require_signed)
        elif args.require_signed:
            from ..hub import HubError

            raise HubError(f"{args.path} was not pulled from a hub, so it carries no signature to check")
        console.print(f"ok: {pkg.kind} {pkg.name}, root {pkg.root}, {len(pkg.files)} files")
    else:
        console.print(generate_key(args.path, args.comment))
    return 0
