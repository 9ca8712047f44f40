from test_crash import *
def test_tmp(make_server):
    s = make_server(size="32M", create_args=["--segment-size", "1M"])
    crash_loop(s, 916700962, 16, 32 * MiB, ops_range=(5, 600), offline_every=0)
