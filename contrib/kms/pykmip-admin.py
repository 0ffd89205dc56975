#!/usr/bin/python3
"""What a KMIP server's administrator does with PyKMIP's own client, for encimg's tests.

    pykmip-admin.py DIR PORT state|revoke|destroy NAME    (NAME: the key's Name attribute,
                                                           "encimg KEY-ID vN" for encimg's keys)
    pykmip-admin.py DIR PORT materials                    (hex of every key's material in the
                                                           server's database, one per line)

DIR is the one contrib/kms/pykmip-server.sh made (certificates, database). Run it with
Debian's /usr/bin/python3, where python3-pykmip is installed.
"""
import sqlite3
import sys

from kmip import enums
from kmip.pie import client


def main():
    d, port, op = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if op == "materials":
        db = sqlite3.connect(d + "/pykmip.db")
        for (value,) in db.execute("select value from managed_objects"):
            print(value.hex())
        return
    name = sys.argv[4]
    c = client.ProxyKmipClient(
        hostname="127.0.0.1", port=port, cert=d + "/client.pem", key=d + "/client.key",
        ca=d + "/ca.pem", ssl_version="PROTOCOL_TLSv1_2",
        kmip_version=enums.KMIPVersion.KMIP_1_2, config_file="/dev/null")
    with c:
        name_attr = c.attribute_factory.create_attribute(enums.AttributeType.NAME, name)
        uids = c.locate(attributes=[name_attr])
        if not uids:
            sys.exit("no key named %r" % name)
        for u in uids:
            if op == "state":
                print(c.get_attributes(u, ["State"])[1][0].attribute_value.value.name)
            elif op == "revoke":
                c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, u)
            elif op == "destroy":
                c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, u)
                c.destroy(u)
            else:
                sys.exit("unknown operation " + op)


if __name__ == "__main__":
    main()
