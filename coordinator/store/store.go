// Package store keeps the coordinator's records — deployments and replica
// groups — in a bbolt file: the one source of truth the reconciler plans
// from, written before any agent hears of a change.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/shoalhq/shoal/spec"
	bolt "go.etcd.io/bbolt"
)

var (
	bucketDeployments = []byte("deployments")
	bucketGroups      = []byte("groups")
	bucketMeta        = []byte("meta")
	keyClusterID      = []byte("cluster_id")
)

// ErrNotFound is returned for a deployment or group that does not exist.
var ErrNotFound = errors.New("not found")

// DeploymentRecord is a stored deployment.
type DeploymentRecord struct {
	Name     string `json:"name"`
	SpecYAML string `json:"spec_yaml"`
	// PrevSpecYAML is the spec before the last change of engine settings
	// (`shoal rollout undo` applies it again); "" when there was none.
	PrevSpecYAML string           `json:"prev_spec_yaml,omitempty"`
	Spec         *spec.Deployment `json:"spec"`
	Created      time.Time        `json:"created"`
	Updated      time.Time        `json:"updated"`
}

// GroupMember is one node of a stored group.
type GroupMember struct {
	NodeID string `json:"node_id"`
	Rank   int    `json:"rank"`
	GRPC   string `json:"grpc"`
}

// Group is a replica group: N nodes serving one replica of a deployment.
type Group struct {
	ID         string        `json:"id"`
	Deployment string        `json:"deployment"`
	Epoch      uint64        `json:"epoch"`
	Members    []GroupMember `json:"members"`
	Created    time.Time     `json:"created"`
	// DrainingSince is when the group began draining (scale-in); zero when
	// it serves. Stored, so that a restarted coordinator (or another one)
	// continues the drain and no router sends it new requests.
	DrainingSince time.Time `json:"draining_since,omitzero"`
	DrainWhy      string    `json:"drain_why,omitempty"`
	// Spec names the engine settings the group was formed with (plan.SpecHash
	// of the deployment then): a group whose Spec differs from its
	// deployment's is replaced by a rollout. Empty (a group stored before
	// rollouts existed): taken as current until the deployment's engine
	// settings change (AdoptSpec then records the replaced ones).
	Spec string `json:"spec,omitempty"`
	// SlurmJob is the Slurm job whose nodes the group runs on (a
	// Slurm-sourced deployment's); empty elsewhere.
	SlurmJob string `json:"slurm_job,omitempty"`
}

// Draining reports whether the group is being scaled in.
func (g *Group) Draining() bool { return !g.DrainingSince.IsZero() }

// Store persists deployments and groups in a bbolt file.
type Store struct{ db *bolt.DB }

// Open opens (creating) the store file.
func Open(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: another coordinator holds it", path)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketDeployments, bucketGroups, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Store{db: db}, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

// EngineSettings is the part of a spec a rollout replaces replicas for
// (model, engine, resources), as canonical JSON. A deployment with roles
// has its two roles' (each with the role's own engine and resources
// merged in), so that a change to one role is a change of the deployment.
func EngineSettings(d *spec.Deployment) string {
	if d.Roles != nil {
		return EngineSettings(d.RoleDeployment(spec.RolePrefill)) + "\n" + EngineSettings(d.RoleDeployment(spec.RoleDecode))
	}
	b, _ := json.Marshal(struct {
		Model     spec.Model
		Engine    spec.Engine
		Resources spec.Resources
	}{d.Model, d.Engine, d.Resources})
	return string(b)
}

// PutDeployment creates or updates a deployment; created reports which.
func (s *Store) PutDeployment(d *spec.Deployment, yaml string) (created bool, err error) {
	return s.PutDeploymentAt(d, yaml, time.Now())
}

// PutDeploymentAt is PutDeployment with the time of the change given (a
// replicated store applies the leader's time on every server).
func (s *Store) PutDeploymentAt(d *spec.Deployment, yaml string, at time.Time) (created bool, err error) {
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDeployments)
		now := at.UTC()
		rec := DeploymentRecord{Name: d.Name, SpecYAML: yaml, Spec: d, Created: now, Updated: now}
		if old := b.Get([]byte(d.Name)); old != nil {
			var prev DeploymentRecord
			if json.Unmarshal(old, &prev) == nil {
				rec.Created, rec.PrevSpecYAML = prev.Created, prev.PrevSpecYAML
				if prev.Spec != nil && EngineSettings(prev.Spec) != EngineSettings(d) {
					rec.PrevSpecYAML = prev.SpecYAML
				}
			}
		} else {
			created = true
		}
		v, err := json.Marshal(rec)
		if err != nil {
			return err
		}
		return b.Put([]byte(d.Name), v)
	})
	return created, err
}

// Deployment returns one deployment.
func (s *Store) Deployment(name string) (*DeploymentRecord, error) {
	var rec *DeploymentRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketDeployments).Get([]byte(name))
		if v == nil {
			return fmt.Errorf("deployment %q: %w", name, ErrNotFound)
		}
		rec = &DeploymentRecord{}
		return json.Unmarshal(v, rec)
	})
	return rec, err
}

// Deployments lists all deployments by name.
func (s *Store) Deployments() ([]*DeploymentRecord, error) {
	var out []*DeploymentRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDeployments).ForEach(func(_, v []byte) error {
			rec := &DeploymentRecord{}
			if err := json.Unmarshal(v, rec); err != nil {
				return err
			}
			out = append(out, rec)
			return nil
		})
	})
	return out, err
}

// DeleteDeployment removes a deployment; its groups are released by the reconciler.
func (s *Store) DeleteDeployment(name string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDeployments)
		if b.Get([]byte(name)) == nil {
			return fmt.Errorf("deployment %q: %w", name, ErrNotFound)
		}
		return b.Delete([]byte(name))
	})
}

// AdoptSpec records spec as the engine settings of the deployment's groups
// that have none (stored before rollouts existed), in one transaction: the
// coordinator calls it with the settings it replaces, so that those groups
// are rolled out like the others.
func (s *Store) AdoptSpec(deployment, spec string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketGroups)
		return b.ForEach(func(k, v []byte) error {
			var g Group
			if err := json.Unmarshal(v, &g); err != nil {
				return err
			}
			if g.Deployment != deployment || g.Spec != "" {
				return nil
			}
			g.Spec = spec
			nv, err := json.Marshal(&g)
			if err != nil {
				return err
			}
			return b.Put(k, nv)
		})
	})
}

// PutGroup stores a group.
func (s *Store) PutGroup(g *Group) error {
	v, err := json.Marshal(g)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketGroups).Put([]byte(g.ID), v) })
}

// PutGroups stores groups in one transaction: all or none.
func (s *Store) PutGroups(gs []*Group) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, g := range gs {
			if err := putJSON(tx.Bucket(bucketGroups), g.ID, g); err != nil {
				return err
			}
		}
		return nil
	})
}

// DeleteGroup removes a group.
func (s *Store) DeleteGroup(id string) error {
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketGroups).Delete([]byte(id)) })
}

// Groups lists all groups, oldest first.
func (s *Store) Groups() ([]*Group, error) {
	var out []*Group
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketGroups).ForEach(func(_, v []byte) error {
			g := &Group{}
			if err := json.Unmarshal(v, g); err != nil {
				return err
			}
			out = append(out, g)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].ID < out[j].ID
	})
	return out, err
}

// ClusterID is the cluster's identity (a random id given when its store was
// first made); "" until one is set.
func (s *Store) ClusterID() (string, error) {
	var id string
	err := s.db.View(func(tx *bolt.Tx) error {
		id = string(tx.Bucket(bucketMeta).Get(keyClusterID))
		return nil
	})
	return id, err
}

// InitClusterID sets the cluster's identity unless it has one; it returns
// the identity the store holds after.
func (s *Store) InitClusterID(id string) (string, error) {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		if cur := b.Get(keyClusterID); cur != nil {
			id = string(cur)
			return nil
		}
		return b.Put(keyClusterID, []byte(id))
	})
	return id, err
}

// Dump is every record of a store: a replicated store's snapshot, and what
// `shoal operator snapshot save` writes.
type Dump struct {
	ClusterID   string              `json:"cluster_id,omitempty"`
	Deployments []*DeploymentRecord `json:"deployments"`
	Groups      []*Group            `json:"groups"`
}

// Dump reads every record in one transaction.
func (s *Store) Dump() (*Dump, error) {
	d := &Dump{}
	err := s.db.View(func(tx *bolt.Tx) error {
		d.ClusterID = string(tx.Bucket(bucketMeta).Get(keyClusterID))
		if err := tx.Bucket(bucketDeployments).ForEach(func(_, v []byte) error {
			rec := &DeploymentRecord{}
			if err := json.Unmarshal(v, rec); err != nil {
				return err
			}
			d.Deployments = append(d.Deployments, rec)
			return nil
		}); err != nil {
			return err
		}
		return tx.Bucket(bucketGroups).ForEach(func(_, v []byte) error {
			g := &Group{}
			if err := json.Unmarshal(v, g); err != nil {
				return err
			}
			d.Groups = append(d.Groups, g)
			return nil
		})
	})
	return d, err
}

// Empty reports whether the store holds no deployment and no group.
func (s *Store) Empty() (bool, error) {
	empty := true
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketDeployments, bucketGroups} {
			if k, _ := tx.Bucket(b).Cursor().First(); k != nil {
				empty = false
			}
		}
		return nil
	})
	return empty, err
}

// Replace makes the store hold exactly d's records, in one transaction (the
// cluster's identity too, when d has one).
func (s *Store) Replace(d *Dump) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if d.ClusterID != "" {
			if err := tx.Bucket(bucketMeta).Put(keyClusterID, []byte(d.ClusterID)); err != nil {
				return err
			}
		}
		for _, name := range [][]byte{bucketDeployments, bucketGroups} {
			if err := tx.DeleteBucket(name); err != nil && !errors.Is(err, bolt.ErrBucketNotFound) {
				return err
			}
			if _, err := tx.CreateBucket(name); err != nil {
				return err
			}
		}
		for _, rec := range d.Deployments {
			if rec == nil || rec.Name == "" {
				return errors.New("a deployment record without a name")
			}
			if err := putJSON(tx.Bucket(bucketDeployments), rec.Name, rec); err != nil {
				return err
			}
		}
		for _, g := range d.Groups {
			if g == nil || g.ID == "" {
				return errors.New("a group record without an id")
			}
			if err := putJSON(tx.Bucket(bucketGroups), g.ID, g); err != nil {
				return err
			}
		}
		return nil
	})
}

// putJSON stores v as JSON under key.
func putJSON(b *bolt.Bucket, key string, v any) error {
	j, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), j)
}
