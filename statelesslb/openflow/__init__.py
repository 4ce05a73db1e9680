"""The OpenFlow edge: ovs-ofctl, the diff against the bridge, table layout."""
