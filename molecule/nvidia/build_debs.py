"""Build the stand-in .deb files of prepare.yml in one task: argv[1] is the package table as JSON,
argv[2] the default version. Each package is a directory tree (files mode 0755), a control file
and `dpkg-deb --build`; an existing .deb is left as it is."""

import json
import os
import subprocess
import sys

packages, default_version = json.loads(sys.argv[1]), sys.argv[2]
for name, pkg in packages.items():
    version = pkg.get("version", default_version)
    deb = f"{pkg.get('dir', '/srv/nvidia-repo')}/{name}_{version}_all.deb"
    if os.path.exists(deb):
        continue
    root = f"/srv/build/{name}"
    for path, content in pkg["files"].items():
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        with open(root + path, "w") as f:
            f.write(content)
        os.chmod(root + path, 0o755)
    os.makedirs(f"{root}/DEBIAN", exist_ok=True)
    with open(f"{root}/DEBIAN/control", "w") as f:
        f.write(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
            f"Maintainer: inferd tests <tests@inferd.invalid>\n{pkg['depends']}"
            f"Description: stand-in for NVIDIA's {name} (molecule tests only)\n"
        )
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", root, deb], check=True, stdout=subprocess.DEVNULL)
    print(deb)
