// Package containerd runs engine commands as containerd containers (client
// module containerd/v2, which speaks the v1 API services that containerd 1.6,
// 1.7 and 2.x daemons serve). Each command is one container in the agent's
// namespace, labelled with the node and engine name; its task is owned by
// containerd's shim, so it outlives the agent and is adopted again from the
// container id the agent persisted.
package containerd
